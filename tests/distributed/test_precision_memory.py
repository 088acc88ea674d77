"""Mixed precision, the distributed optimizer and activation recomputation through megatron's
own machinery, checked on CPU: recomputation and ZeRO-1 change no number; bf16/fp16 stay within
a stated tolerance of fp32; a bf16 distributed-optimizer run resumes exactly."""

from __future__ import annotations

import pytest

from tests.conftest import losses, run_train

pytestmark = pytest.mark.distributed

COMMON = ["model=gpt_tiny", "task.group_size=4", "trainer.max_steps=5", "trainer.log_interval=1",
          "trainer.eval_at_end=false", "trainer.save_final=false", "data.max_length=64",
          "optim.lr=1e-3", "model.init_method_std=0.1"]


def _run(tmp_path, name, extra, nproc=1):
    out = tmp_path / name
    run_train([*COMMON, f"trainer.output_dir={out}", *extra], nproc=nproc)
    return losses(out)


def test_recompute_changes_nothing(tmp_path):
    ref = _run(tmp_path, "none", [])
    for mode in ("selective", "full"):
        got = _run(tmp_path, mode, [f"trainer.recompute={mode}"])
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-6), (mode, step)


@pytest.mark.parametrize("precision, tol", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_half_precision_tracks_fp32(tmp_path, precision, tol):
    ref = _run(tmp_path, "fp32", [])
    got = _run(tmp_path, precision, [f"trainer.precision={precision}"])
    assert max(ref.values()) - min(ref.values()) > 0.05  # losses move, so the check means something
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=tol), (precision, step, got, ref)


def test_distributed_optimizer_matches_and_resumes(tmp_path):
    plain = _run(tmp_path, "plain", [], nproc=2)
    zero1 = _run(tmp_path, "zero1", ["parallel.use_distributed_optimizer=true"], nproc=2)
    for step in plain:
        assert zero1[step] == pytest.approx(plain[step], abs=1e-6), step

    # bf16 + ZeRO-1: stop after 3 steps, resume to 5, equal to the uninterrupted run.
    bf16 = ["parallel.use_distributed_optimizer=true", "trainer.precision=bf16"]
    full = _run(tmp_path, "bf16_full", bf16, nproc=2)
    split = tmp_path / "bf16_split"
    run_train([*COMMON, *bf16, f"trainer.output_dir={split}", "trainer.stop_at_step=3",
               "trainer.save_final=true"], nproc=2)
    run_train([*COMMON, *bf16, f"trainer.output_dir={split}", "trainer.resume=true"], nproc=2)
    resumed = losses(split)
    for step in range(4, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
