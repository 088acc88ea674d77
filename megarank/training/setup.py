"""What a training run needs beyond its model stage (megarank/stage.py builds that): the run
directory and this data-parallel rank's stream of micro-batches."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from megarank.config.validate import ConfigError
from megarank.data.collate import PairCollator
from megarank.data.groups import GroupDataset
from megarank.data.sampler import GroupSampler
from megarank.data.triplets import read_triplets
from megarank.parallel.runtime import Runtime


def resolve_output_dir(cfg: DictConfig, rt: Runtime) -> Path:
    """trainer.output_dir, or a fresh dated directory chosen on rank 0 and shared with all ranks."""
    name = cfg.trainer.output_dir
    if name is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"runs/{stamp}-{cfg.model.name}-{cfg.task.loss}"
    holder = [str(Path(name).resolve())]
    dist.broadcast_object_list(holder, src=0)
    out = Path(holder[0])
    if rt.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def build_data(cfg: DictConfig, rt: Runtime, collator: PairCollator, consumed_samples: int):
    """The training groups and an endless iterator of this DP rank's micro-batches."""
    records = read_triplets(cfg.data.train_path, cfg.data.max_records)
    if cfg.task.loss == "distill" or cfg.task.distill_weight > 0:
        for r in records:
            if r.pos_scores is None or (r.neg and r.neg_scores is None):
                raise ConfigError(
                    f"{r.source}: record has no teacher scores (pos_scores/neg_scores), which "
                    f"task.loss={cfg.task.loss} with task.distill_weight={cfg.task.distill_weight} "
                    "needs; mine them with `megarank mine --retriever dense|model`")
    dataset = GroupDataset(records, cfg.task.group_size, cfg.trainer.seed)
    sampler = GroupSampler(
        len(dataset), cfg.trainer.micro_batch_size, rt.dp_rank, rt.dp_size, cfg.trainer.seed,
        consumed_samples=consumed_samples,
    )

    def micro_batches():
        for items in sampler:
            yield collator([dataset[i, e] for i, e in items])

    return dataset, micro_batches()
