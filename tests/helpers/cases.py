"""One launch, many checks: run a list of cases (training runs, commands) one after another in
the same ranks, rebuilding the process group, megatron's parallel state and the model for each
case but not the interpreter, and report each case to the test.

    results = run_cases({"tp2": train_case([...overrides]),
                         "import": cli_case("megarank.convert", ["from-hf", ...])}, nproc=2)
    results["tp2"]   # the run's metrics.jsonl records (rank 0), or None for a command

A case that fails stops the launch; the error names the case. Cases run in the order given, so a
later case may read what an earlier one wrote (a resumed run after the run it resumes).

The worker (``python -m tests.helpers.cases CASES.json OUT.json``) rendezvouses each case's
process group through a file of its own beside OUT.json, so a re-initialised group needs no port
and never reads the addresses of the one before it; megarank's runtime finds the group
initialised and uses it, and its shutdown (or the worker's) tears it down after the case.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.runs import run_module


def train_case(overrides: list[str], output_dir: str | Path | None = None) -> dict:
    """A training run (``megarank.train_model(overrides)``); without ``output_dir`` it writes
    into a directory of the launch's own, and only its metrics come back."""
    return {"train": [str(o) for o in overrides],
            "output_dir": None if output_dir is None else str(output_dir)}


def cli_case(module: str, args: list) -> dict:
    """A command (``module.main(args)``), as ``python -m module args`` would run it."""
    return {"cli": module, "args": [str(a) for a in args]}


def run_cases(cases: dict[str, dict], nproc: int, workdir: str | Path | None = None,
              timeout: int = 1800) -> dict[str, list[dict] | None]:
    """Run ``cases`` (name -> :func:`train_case` / :func:`cli_case`) in one launch of ``nproc``
    ranks (torchrun when > 1); return name -> the run's logged step records (training cases)
    or None (commands)."""
    with tempfile.TemporaryDirectory(prefix="megarank-cases-", dir=workdir) as tmp:
        spec, out = Path(tmp) / "cases.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(cases))
        run_module("tests.helpers.cases", [spec, out], nproc=nproc, timeout=timeout)
        return json.loads(out.read_text())


def _run_case(name: str, case: dict, scratch: Path) -> list[dict] | None:
    if "train" in case:
        import megarank

        out = Path(case["output_dir"] or scratch / name)
        megarank.train_model([*case["train"], f"trainer.output_dir={out}",
                              "trainer.progress_bar=false"])
        metrics = out / "metrics.jsonl"
        if not metrics.is_file():
            return []
        return [json.loads(line) for line in metrics.read_text().splitlines()
                if '"loss"' in line]
    import importlib

    try:
        importlib.import_module(case["cli"]).main(case["args"])
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{case['cli']} exited with {e.code!r}") from None
    return None


def main(cases_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from megarank.parallel.runtime import shutdown

    cases = json.loads(Path(cases_path).read_text())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    results = {}
    with tempfile.TemporaryDirectory(prefix="megarank-case-runs-") as scratch:
        for i, (name, case) in enumerate(cases.items()):
            dist.init_process_group("gloo", init_method=f"file://{out_path}.rdzv{i}",
                                    rank=rank, world_size=world)
            start = time.monotonic()
            try:
                results[name] = _run_case(name, case, Path(scratch))
            except BaseException as e:
                raise RuntimeError(f"case {name!r} failed on rank {rank}: {e}") from e
            finally:
                shutdown()
            if rank == 0:  # shown with a failing test's output: where a launch's time went
                print(f"[cases] {name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
