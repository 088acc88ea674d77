"""``megarank train`` (Hydra's entry point, ``megarank.train.main``) validates the config before
any process group or model exists. It runs here in this process, through the command line's
dispatch; tests/e2e/test_stop_signal.py starts ``python -m megarank.train`` as a process."""

from __future__ import annotations

import sys

from tests.helpers.runs import run_cli


def test_train_rejects_bad_config_before_building(tmp_path, monkeypatch):
    # The launcher validates before any process group or model exists: a fast, clear failure.
    # `megarank train` hands Hydra its arguments through sys.argv: given back afterwards.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    proc = run_cli("megarank.cli", ["train", "parallel=tp2_pp1", "trainer.progress_bar=false",
                                    f"trainer.output_dir={tmp_path}/x"], check=False)
    assert proc.returncode != 0
    assert "world size (1) must be divisible by parallel.tensor_model_parallel_size (2)" in (
        proc.stderr + proc.stdout)
    assert not (tmp_path / "x").exists()
