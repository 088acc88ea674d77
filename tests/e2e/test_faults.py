"""Faults a long run meets, on a tiny encoder in this process: a diverging loss, a damaged
checkpoint, a full disk, and checkpoint retention."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megarank.checkpoint.sharded import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    verify_checkpoint,
)
from megarank.config import compose
from megarank.training.loop import NonFiniteError, train
from tests.helpers.runs import read_metrics

BASE = ["model=bert_tiny", "model.num_layers=2", "task=listwise", "task.group_size=4",
        "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "trainer.log_interval=1",
        "trainer.eval_interval=0", "trainer.eval_at_end=false", "trainer.progress_bar=false",
        "pair.max_length=32", "pair.max_query_length=8", "optim.lr=1e-3", "data.max_records=16"]


def _train(out: Path, *overrides: str, poison: frozenset[int] = frozenset()) -> dict:
    return train(compose([*BASE, f"trainer.output_dir={out}", *overrides]), poison)


def test_non_finite_steps_are_skipped_counted_and_never_saved(tmp_path):
    out = tmp_path / "run"
    _train(out, "trainer.max_steps=8", "trainer.save_interval=2", poison=frozenset({4, 5}))
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert [s for s, r in records.items() if not r["loss"] == r["loss"]] == [4, 5]  # NaN
    assert records[3]["skipped_steps"] == 0 and records[5]["skipped_steps"] == 2
    assert all(torch.isfinite(torch.tensor(records[s]["loss"])) for s in (6, 7, 8))
    names = [p.name for p in complete_checkpoints(out / "checkpoints")]
    # step 4 came right after a skipped step: not saved; 2, 6 and 8 were.
    assert names == ["step_0000008", "step_0000006", "step_0000002"]
    # A skipped update leaves weights, Adam state and schedule as they were: had the NaN
    # gradients been applied, every later loss would be NaN; the LR did not move either.
    assert records[4]["lr"] == records[5]["lr"] == records[6]["lr"]
    assert all(torch.isfinite(torch.tensor(records[s]["grad_norm"])) for s in (6, 7, 8))


def test_k_non_finite_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="3 steps in a row") as err:
        _train(out, "trainer.max_steps=10", "trainer.save_interval=2",
               "trainer.max_nonfinite_steps=3", poison=frozenset(range(4, 11)))
    assert "step_0000002" in str(err.value)
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == "step_0000002"
    assert [p.name for p in complete_checkpoints(root)] == ["step_0000002"]
    # latest still scores finitely
    import megarank

    with megarank.load_scorer(out) as scorer:
        scores = scorer.score([("a query", "a document"), ("another", "text")])
    assert all(torch.isfinite(torch.tensor(scores)))
    last = read_metrics(out)[-1]
    assert last["step"] == 6 and last["skipped_steps"] == 3


def test_a_truncated_checkpoint_is_named_and_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    _train(out, "trainer.max_steps=6", "trainer.stop_at_step=4", "trainer.save_interval=2")
    step4 = out / "checkpoints" / "step_0000004"
    victim = max((p for p in step4.iterdir() if p.suffix == ".distcp"),
                 key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    problems = verify_checkpoint(step4)
    assert len(problems) == 1 and victim.name in problems[0] and str(size) in problems[0]
    import megarank

    with pytest.raises(CheckpointError, match=victim.name):
        megarank.load_scorer(step4)
    _train(out, "trainer.max_steps=6", "trainer.resume=true", "trainer.save_interval=2")
    records = [r for r in read_metrics(out) if "loss" in r]
    # the resumed run trained steps 3..6 again from step 2
    assert [r["step"] for r in records][-4:] == [3, 4, 5, 6]
    assert latest_checkpoint(out / "checkpoints").name == "step_0000006"


def test_keep_last_and_save_time_in_metrics(tmp_path):
    out = tmp_path / "run"
    _train(out, "trainer.max_steps=5", "trainer.save_interval=1", "trainer.keep_last=2")
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == [
        "step_0000005", "step_0000004"]
    saved = [r for r in read_metrics(out) if "save_s" in r]
    assert [r["step"] for r in saved] == [1, 2, 3, 4, 5]
    assert all(r["save_s"] > 0 and r["save_bytes"] > 1_000_000 for r in saved)
    on_disk = sum(p.stat().st_size for p in (out / "checkpoints" / "step_0000005").rglob("*")
                  if p.is_file() and p.name != "megarank.json")
    assert saved[-1]["save_bytes"] == on_disk


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "40m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        out = disk / "run"
        # one checkpoint of this model with its Adam state is ~25 MB: the second does not fit
        with pytest.raises(CheckpointError, match="no space left"):
            _train(out, "trainer.max_steps=4", "trainer.save_interval=1")
        root = out / "checkpoints"
        good = latest_checkpoint(root)
        assert good is not None and verify_checkpoint(good) == []
        assert not list(root.glob("*.partial"))
        meta = json.loads((good / "megarank.json").read_text())
        assert meta["step"] >= 1 and good.name == f"step_{meta['step']:07d}"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_keep_best_marks_and_keeps_the_best_checkpoint(tmp_path):
    import megarank
    from megarank.checkpoint.sharded import best_checkpoint
    from megarank.config.schema import ASSETS

    out = tmp_path / "run"
    _train(out, "trainer.max_steps=6", "trainer.eval_interval=2", "trainer.keep_best=NDCG@10",
           "trainer.keep_last=1", "trainer.save_final=true", "optim.lr=5e-3",
           f"data.eval_collection={ASSETS / 'collections/cranfield'}", "data.eval_top_k=5",
           "data.eval_max_queries=20")
    evals = {r["step"]: r["eval/NDCG@10"] for r in read_metrics(out) if "eval/NDCG@10" in r}
    assert sorted(evals) == [2, 4, 6]
    best_step = max(evals, key=lambda s: (evals[s], -s))  # the first of equal bests
    best = best_checkpoint(out / "checkpoints")
    assert best["step"] == best_step and best["value"] == evals[best_step]
    kept = {p.name for p in complete_checkpoints(out / "checkpoints")}
    assert kept == {"step_0000006", best["path"].name}  # keep_last=1 never drops the best
    hf = megarank.convert_to_hf(out, tmp_path / "hf", best=True)
    assert json.loads((hf / "scoring.json").read_text())["pooling"] == "cls"
    from megarank.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.keep_best needs evaluation"):
        _train(tmp_path / "x", "trainer.keep_best=NDCG@10", "trainer.eval_interval=0",
               "trainer.eval_at_end=false")


def test_async_save_writes_the_same_checkpoints_while_training_goes_on(tmp_path):
    from megarank.checkpoint.sharded import read_meta

    sync, asyn = tmp_path / "sync", tmp_path / "async"
    common = ["trainer.max_steps=6", "trainer.save_interval=2"]
    _train(sync, *common)
    _train(asyn, *common, "trainer.async_save=true")
    assert losses_of(asyn) == losses_of(sync)
    names = [p.name for p in complete_checkpoints(asyn / "checkpoints")]
    assert names == ["step_0000006", "step_0000004", "step_0000002"]
    assert not list((asyn / "checkpoints").glob("*.partial"))
    assert latest_checkpoint(asyn / "checkpoints").name == "step_0000006"
    for name in names:
        assert verify_checkpoint(asyn / "checkpoints" / name) == []
        assert read_meta(asyn / "checkpoints" / name)["files"].keys() == read_meta(
            sync / "checkpoints" / name)["files"].keys()
    done = [r for r in read_metrics(asyn) if "checkpoint" in r]
    assert [r["checkpoint"] for r in done] == names[::-1]
    assert all(r["save_total_s"] > 0 and r["save_bytes"] > 1_000_000 for r in done)
    # Training went on: steps 2 and 4 became complete only at a later step's finalize.
    assert all(r["step"] > int(r["checkpoint"][-7:]) for r in done[:2]), done
    # an asynchronously written checkpoint resumes exactly
    _train(asyn, "trainer.max_steps=8", "trainer.save_interval=2", "trainer.resume=true")
    _train(sync, "trainer.max_steps=8", "trainer.save_interval=2", "trainer.resume=true")
    assert losses_of(asyn) == losses_of(sync)


def losses_of(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
