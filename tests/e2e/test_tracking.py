"""Run tracking beside metrics.jsonl: TensorBoard event files (logging=tensorboard) and an offline
Weights & Biases run (logging.wandb=true) hold every number metrics.jsonl holds, at its step,
evaluation metrics included; a resumed run shows each step once in TensorBoard.

The runs train in this process (megarank.train_model); W&B starts its own service process, so
these tests live outside the in-process tier."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers.runs import read_metrics

COMMON = ["model=gpt_tiny", "task=listwise", "task.group_size=4", "trainer.global_batch_size=4",
          "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.progress_bar=false",
          "logging=tensorboard"]


def _scalars(run_dir):
    """tag -> [(step, value)] from the run's TensorBoard event files, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _numbers(record):
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def test_tensorboard_and_wandb_hold_every_logged_number(tmp_path, monkeypatch):
    import megarank

    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    megarank.train_model([*COMMON, "trainer.max_steps=3", "logging.wandb=true",
                          f"trainer.output_dir={out}"])
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert any("@" in k for k in records[-1])  # the evaluation at the end was logged

    scalars = _scalars(out)
    expected = {}
    for r in records:
        for key, value in _numbers(r).items():
            expected.setdefault(key, []).append((r["step"], value))
    assert sorted(scalars) == sorted(expected)
    for tag, points in expected.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got, points, strict=True):  # TensorBoard keeps float32
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30), (tag, a, b)

    # The offline W&B run: one run directory whose record log holds every number logged.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for r in records:
        for key, value in _numbers(r).items():
            assert key.encode() in log and json.dumps(value).encode() in log, (r["step"], key)


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """An attempt that logged steps 3 and 4 but whose step-4 checkpoint was lost resumes from
    step 2; TensorBoard then shows steps 3 and 4 of the resumed attempt only."""
    import megarank

    out = tmp_path / "run"
    common = [*COMMON, "trainer.max_steps=4", "trainer.save_interval=2",
              "trainer.eval_at_end=false", f"trainer.output_dir={out}"]
    megarank.train_model(common)
    ckpts = out / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step_0000004")
    (ckpts / "latest").write_text("step_0000002")
    megarank.train_model([*common, "trainer.resume=true"])
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4]
    last = {r["step"]: r for r in records}  # the resumed attempt's records for steps 3 and 4
    scalars = _scalars(out)
    for tag in ("loss", "pairs_per_s", "grad_norm"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], (tag, scalars[tag])
        for step, value in scalars[tag]:
            assert value == pytest.approx(last[step][tag], rel=1e-6), (tag, step)
