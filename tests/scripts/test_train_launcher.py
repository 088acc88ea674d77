"""``python -m megarank.train`` validates the config before any process group or model exists."""

from __future__ import annotations

from tests.helpers.runs import run_train


def test_train_rejects_bad_config_before_building(tmp_path):
    # The launcher validates before any process group or model exists: a fast, clear failure.
    proc = run_train(["parallel=tp2_pp1", f"trainer.output_dir={tmp_path}/x"], check=False)
    assert proc.returncode != 0
    assert "world size (1) must be divisible by parallel.tensor_model_parallel_size (2)" in (
        proc.stderr + proc.stdout)
    assert not (tmp_path / "x").exists()
