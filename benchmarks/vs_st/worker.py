"""The sentence-transformers training run, in a process of its own so that its memory is
measured alone: ``python -m vs_st.worker JOB.json`` (benchmarks/ on the path).

The job file (written by the harness) names the start model, megarank's starting head, the groups
in megarank's step order and the shared optimizer settings. The worker trains with
sentence-transformers' CrossEncoderTrainer, saves the model, and writes the step-end times, the
learning rate of every step and the logged losses to the job's ``metrics`` file. It imports
nothing of megarank.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def training_data(job: dict[str, Any], groups: list[dict[str, Any]]) -> tuple[dict, str, int]:
    """(the dataset columns, the loss, rows per step) for ``job["loss"]``."""
    if job["loss"] in ("listwise", "distill"):
        if job["loss"] == "listwise":
            # ListNetLoss is CE(scores, softmax(labels)): these labels make the target one-hot.
            labels = [[0.0] + [-math.inf] * (len(g["docs"]) - 1) for g in groups]
        else:
            # CE(scores, softmax(teacher / T)): megarank's KL plus a constant.
            labels = [[t / job["teacher_temperature"] for t in g["teacher"]] for g in groups]
        data = {"query": [g["query"] for g in groups], "docs": [g["docs"] for g in groups],
                "labels": labels}
        return data, "listnet", job["groups_per_step"]
    data = {"query": [g["query"] for g in groups for _ in g["docs"]],
            "doc": [d for g in groups for d in g["docs"]],
            "label": [float(i == 0) for g in groups for i in range(len(g["docs"]))]}
    return data, "bce", job["groups_per_step"] * job["group_size"]


def train(job_path: Path) -> None:
    """Run the job at ``job_path``."""
    job = json.loads(job_path.read_text())
    import torch

    torch.set_num_threads(job["threads"])
    from datasets import Dataset
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    class InOrder(DefaultBatchSampler):
        """Consecutive rows in dataset order: the rows already are megarank's step order."""

        def __init__(self, dataset: Any, **kwargs: Any) -> None:
            super().__init__(SequentialSampler(dataset), **kwargs)

    class Record(TrainerCallback):
        """Step-end times, the LR each step used, and the logged loss."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.lr: list[float] = []
            self.loss: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads = torch.get_num_threads()  # what training really ran with
            self.ends.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):
            self.lr.append(kwargs["optimizer"].param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

    model = CrossEncoder(job["model_dir"], num_labels=1, max_length=job["max_length"])
    head = torch.load(job["head_init"], weights_only=True)
    with torch.no_grad():  # megarank's starting head, so that every starting tensor is equal
        model.model.classifier.weight.copy_(head["weight"])
        model.model.classifier.bias.copy_(head["bias"])
    groups = [json.loads(line) for line in Path(job["groups"]).read_text().splitlines()]
    data, loss_name, batch = training_data(job, groups)
    # ListNetLoss: one forward over the whole step (default: mini-batches of batch_size pairs).
    loss = (losses.ListNetLoss(model, mini_batch_size=-1) if loss_name == "listnet"
            else losses.BinaryCrossEntropyLoss(model))
    args = CrossEncoderTrainingArguments(
        output_dir=job["trainer_dir"], max_steps=job["steps"], per_device_train_batch_size=batch,
        learning_rate=job["lr"], warmup_steps=job["warmup_steps"], lr_scheduler_type="linear",
        weight_decay=job["weight_decay"], adam_beta1=job["adam_beta1"],
        adam_beta2=job["adam_beta2"], adam_epsilon=job["adam_eps"],
        max_grad_norm=job["clip_grad"], optim="adamw_torch", seed=job["seed"], use_cpu=True,
        dataloader_num_workers=0, dataloader_drop_last=False, batch_sampler=InOrder,
        save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True, bf16=job.get("bf16", False),
    )
    record = Record()
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data),
                                  loss=loss, callbacks=[record])
    trainer.train()
    model.save(job["save_dir"])
    Path(job["metrics"]).write_text(json.dumps(
        {"step_ends": record.ends, "lr": record.lr, "loss": record.loss,
         "torch_threads": record.threads}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m vs_st.worker JOB.json")
    train(Path(sys.argv[1]))
