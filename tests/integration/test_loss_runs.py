"""Each rerank loss preset in a real training run (bert_tiny, in process): the logged loss falls."""

from __future__ import annotations

import math

import pytest


def _triplets_with_teacher(path, n: int = 8):
    """The first ``n`` shipped Cranfield triplets with teacher scores: the positive 0.9, the
    negatives 0.6, 0.58, ... in their file order (an order the student can learn)."""
    import json

    from megarank.config.schema import ASSETS
    from megarank.data.triplets import read_triplets

    with open(path, "w") as f:
        for r in read_triplets(ASSETS / "collections/cranfield/train_triplets.jsonl", n):
            neg = list(r.neg[:7])
            f.write(json.dumps({"query": r.query, "pos": [r.pos[0]], "neg": neg,
                                "pos_scores": [0.9],
                                "neg_scores": [0.6 - 0.02 * i for i in range(len(neg))]}) + "\n")
    return path


@pytest.mark.parametrize("task,extra", [
    ("margin_mse", []), ("ranknet", []), ("ranknet", ["task.target=teacher"]),
    ("lambdarank", []), ("listnet", []), ("mixed", ["task.distill_term=margin_mse"]),
])
def test_real_training_run_lowers_each_new_loss(task, extra, tmp_path):
    """bert_tiny trained in process through megarank.train_model with each new loss preset: the
    logged loss falls (mean of the last 4 steps under 90% of the first 4 steps')."""
    import json

    import megarank

    data = _triplets_with_teacher(tmp_path / "teacher.jsonl")
    out = tmp_path / "run"
    megarank.train_model([
        "model=bert_tiny", f"task={task}", *extra, "task.group_size=4", "data=beir",
        f"data.train_path={data}", "trainer.max_steps=24",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_interval=1",
        "trainer.save_interval=0", "trainer.eval_interval=0", "trainer.eval_at_end=false",
        "trainer.save_final=false", "trainer.progress_bar=false", "pair.max_length=64",
        "pair.max_query_length=16", "optim.lr=2e-3", "optim.warmup_steps=0",
        f"trainer.output_dir={out}",
    ])
    cfg = (out / "config.yaml").read_text()
    assert f"loss: {megarank.compose_config([f'task={task}']).task.loss}" in cfg
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
