"""Shared helpers: launch real training runs (one process or torchrun) and read what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "megarank" / "assets" / "collections"


def data_dir(name: str) -> Path:
    """A collection shipped in the package (megarank/assets/collections/<name>)."""
    path = ASSETS / name
    assert path.is_dir(), f"no shipped collection {name!r} under {ASSETS}"
    return path


def run_train(overrides: list[str], nproc: int = 1, timeout: int = 900,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``megarank.train`` with ``nproc`` gloo ranks (torchrun when > 1); one thread per rank."""
    return run_module("megarank.train", ["trainer.progress_bar=false", *overrides], nproc,
                      timeout, check)


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 900,
               check: bool = True) -> subprocess.CompletedProcess:
    """``python -m module args`` with ``nproc`` gloo ranks (torchrun when > 1).

    The command runs in a fresh empty directory, deleted afterwards, so nothing it writes to a
    relative path (a default ``runs/...`` output dir, Hydra's ``outputs/``, ``wandb/``) lands in
    the checkout; arguments naming files must be absolute. ``megarank`` is imported from the
    installed package. The directory holds only a ``tests`` link to the checkout's tests, so
    helper modules (``tests.parity.score_worker``) still run with ``-m``.
    """
    # One thread per rank when ranks share the 2 cores; both cores for a single process.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1" if nproc > 1 else "2", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", module]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module]
    cmd += [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="megarank-cwd-") as cwd:
        (Path(cwd) / "tests").symlink_to(REPO / "tests", target_is_directory=True)
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def grad_norms(run_dir: Path) -> dict[int, float]:
    """step -> logged global gradient norm."""
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# Caches Python and the linters keep next to the sources; they are not outputs of a test.
_CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".import_linter_cache"}


def _untracked_paths() -> set[tuple[str, str]] | None:
    """(git status code, path) of every untracked and ignored file in the checkout, caches left
    out; None where the tree is not a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "-z", "--ignored",
                              "--untracked-files=all"], cwd=REPO, capture_output=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    entries = set()
    for entry in out.decode(errors="replace").split("\0"):
        code, path = entry[:2], entry[3:]
        if code in ("??", "!!") and not _CACHES.intersection(Path(path).parts):
            entries.add((code, path))
    return entries


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Fail the session if tests wrote into the checkout: a new ignored file (runs/, outputs/,
    build/, ...) anywhere, or a new untracked file or folder at the top level (wandb/, logs/).
    New untracked files inside existing folders are not counted, since sources are edited while
    tests run; tests write under tmp_path."""
    before = _untracked_paths()
    yield
    after = _untracked_paths()
    if before is None or after is None:
        return
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    top = {Path(path).parts[0] for path in tracked if path}
    top |= {Path(path).parts[0] for _, path in before}
    new = sorted(path for code, path in after - before
                 if code == "!!" or Path(path).parts[0] not in top)
    if new:
        pytest.fail("tests wrote into the checkout " + str(REPO) + ":\n  " + "\n  ".join(new[:50]),
                    pytrace=False)
