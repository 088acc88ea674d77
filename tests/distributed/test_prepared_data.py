"""Training from a prepared dataset (``megarank prepare``) under torchrun with two data-parallel
ranks: the same losses as the JSONL path, step for step, over two epochs with teacher scores;
an exact resume from the prepared dataset; the data wait logged; another truncation refused.

The four 2-rank runs are the cases of one launch; preparing and the refused run are in this
process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megarank.data.prepared import PreparedError
from tests.helpers.cases import run_cases, train_case
from tests.helpers.runs import ASSETS, losses, read_metrics, run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CRANFIELD = ASSETS / "cranfield" / "train_triplets.jsonl"
# 112 groups, 8 per step: 14 steps an epoch, so 30 steps cross into a third epoch.
COMMON = ["model=gpt_tiny", "task=listwise", "task.group_size=4", "task.distill_weight=0.5",
          "trainer.max_steps=30", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
          "trainer.log_interval=1", "trainer.eval_at_end=false", "optim.lr=1e-3",
          "optim.warmup_steps=3", "model.hidden_dropout=0.1", "pair.max_length=64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Cranfield's triplets with teacher scores, and the directory `megarank prepare` makes."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(1)
    jsonl = root / "scored.jsonl"
    with open(CRANFIELD) as f, open(jsonl, "w") as out:
        for line in f:
            row = json.loads(line)
            row["pos_scores"] = rng.normal(size=len(row["pos"])).tolist()
            row["neg_scores"] = rng.normal(size=len(row["neg"])).tolist()
            out.write(json.dumps(row) + "\n")
    prepared = root / "prep"
    proc = run_cli("megarank.prepare", ["--input", jsonl, "--out", prepared, "model=gpt_tiny",
                                        "pair.max_length=64"])
    assert "112 groups" in proc.stderr
    return jsonl, prepared


def test_prepared_trains_like_jsonl_and_resumes_exactly(tmp_path, data):
    jsonl, prepared = data
    a, b, c = tmp_path / "jsonl", tmp_path / "prepared", tmp_path / "split"
    run_cases({
        "jsonl": train_case([*COMMON, f"data.train_path={jsonl}", "trainer.save_final=false"],
                            output_dir=a),
        "prepared": train_case([*COMMON, f"data.train_path={prepared}",
                                "trainer.save_final=false"], output_dir=b),
        "split": train_case([*COMMON, f"data.train_path={prepared}", "trainer.stop_at_step=17"],
                            output_dir=c),
        "resumed": train_case([*COMMON, f"data.train_path={prepared}", "trainer.resume=true"],
                              output_dir=c),
    }, nproc=2)
    la, lb = losses(a), losses(b)
    assert sorted(la) == list(range(1, 31))
    assert la[30] < la[1]  # it trains
    assert lb == la  # same groups, order, token ids and teacher scores: bitwise the same losses
    assert all(r["data_wait_s"] >= 0 for r in read_metrics(b) if "loss" in r)

    lc = losses(c)
    assert sorted(lc) == list(range(1, 31))
    for step in range(18, 31):
        assert lc[step] == pytest.approx(lb[step], abs=1e-6), (step, lb[step], lc[step])


def test_training_refuses_a_dataset_prepared_with_other_truncation(tmp_path, data):
    import megarank
    from megarank.parallel.runtime import shutdown

    _, prepared = data
    try:
        with pytest.raises(PreparedError) as refused:
            megarank.train_model([*COMMON[:-1], "pair.max_length=128",
                                  f"data.train_path={prepared}",
                                  f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=5",
                                  "trainer.progress_bar=false"])
    finally:
        shutdown()
    assert "max_length (config field pair.max_length): prepared with 64, this run has 128" in (
        str(refused.value))
