"""Launch real training runs and commands (one process or torchrun) and read what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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


def run_cli(module: str, args: list, check: bool = True) -> subprocess.CompletedProcess:
    """``module.main(args)`` in this process, for command-line tests where nothing about a fresh
    process is under test (argument parsing, what a command prints and writes, its refusals).

    Like :func:`run_module`: the command runs in a fresh empty directory, its stdout and stderr
    are captured, and the result is a ``CompletedProcess`` whose return code is what the command
    would have exited with (an uncaught exception is 1, its traceback on stderr). Any process
    group and megatron parallel state the command brought up are torn down afterwards, so the
    next test starts from nothing.
    """
    import contextlib
    import importlib
    import io
    import traceback

    from megarank.parallel.runtime import shutdown

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="megarank-cwd-") as tmp:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    importlib.import_module(module).main(argv)
                except SystemExit as e:
                    if isinstance(e.code, int) or e.code is None:
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                        code = 1
                except Exception:  # noqa: BLE001 - reported as the process would report it
                    traceback.print_exc()
                    code = 1
        finally:
            os.chdir(cwd)
            shutdown()
    proc = subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{module} {' '.join(argv)} failed ({code}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_benchmark(name: str, monkeypatch):
    """``benchmarks/<name>.py`` as a module named ``name``, registered in ``sys.modules`` for
    the test (dataclasses look their module up there), to call its pieces without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
