"""What ``trainer.keep_freed_memory`` saves a CPU training step: page faults, kernel time and
step time with glibc's default allocator settings against megarank's, MiniLM's shapes.

    python benchmarks/cpu_allocator.py [--rows 16] [--length 128] [--rounds 7] [--json]

The setting belongs to a process's allocator for good, so each side is its own worker process
(this script with ``--worker false|true``), both built from the same config and batch (MiniLM
geometry, random weights, dropout as the model has it, one thread). The parent asks each for one
training step in turn (forward, backward, gradients into megatron's buffers), round after round,
so the machine's drift from minute to minute weighs on both alike. Each worker reports its step's
wall time, minor page faults and system (kernel) time from ``getrusage``; after two warm-up steps,
the medians of ``--rounds`` rounds are printed as a table, with the resident memory at the end.
``--json`` prints the medians as one JSON line instead (the suite reads that form).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

WARMUP = 2


def worker(keep: str, rows: int, length: int) -> None:
    """Build the model, then answer each line on stdin with one measured step on stdout."""
    import torch

    from megarank.bundle import build_bundle
    from megarank.config import compose

    torch.set_num_threads(1)
    cfg = compose(["model=minilm", f"pair.max_length={length}", "trainer.device=cpu",
                   f"trainer.keep_freed_memory={keep}"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        model = bundle.model
        model.train()
        ids = torch.randint(1000, 20000, (rows, length),
                            generator=torch.Generator().manual_seed(0))
        batch = (ids, torch.ones_like(ids), torch.zeros_like(ids),
                 torch.zeros(rows, dtype=torch.long))
        print("ready", flush=True)
        for _ in sys.stdin:
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            model.zero_grad_buffer()
            model(*batch).float().sum().backward()
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({"ms": seconds * 1e3, "faults": after.ru_minflt - before.ru_minflt,
                              "system_ms": (after.ru_stime - before.ru_stime) * 1e3,
                              "rss_mib": after.ru_maxrss / 1024}), flush=True)


def measure(rows: int, length: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Both workers' steps, in turns; per setting the medians after the warm-up steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {keep: subprocess.Popen(
        [sys.executable, __file__, "--worker", keep, "--rows", str(rows), "--length", str(length)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for keep in ("false", "true")}
    steps: dict[str, list[dict[str, float]]] = {keep: [] for keep in procs}
    try:
        for keep, proc in procs.items():
            for line in proc.stdout:  # megatron and the model may print before the worker is
                if line.strip() == "ready":  # ready
                    break
            else:
                raise RuntimeError(f"worker keep_freed_memory={keep} exited with "
                                   f"{proc.wait()} before its first step")
        for _ in range(WARMUP + rounds):
            for keep, proc in procs.items():
                proc.stdin.write("step\n")
                proc.stdin.flush()
                steps[keep].append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=120)
    return {keep: {key: statistics.median(s[key] for s in taken[WARMUP:])
                   for key in ("ms", "faults", "system_ms")} | {"rss_mib": taken[-1]["rss_mib"]}
            for keep, taken in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=("false", "true"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.rows, args.length)
        return
    result = measure(args.rows, args.length, args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    print(f"MiniLM, {args.rows} pairs x {args.length} tokens, 1 thread, a training step per "
          f"turn, median of {args.rounds} rounds after {WARMUP} warm-up steps\n")
    print("| trainer.keep_freed_memory | step ms | minor page faults / step "
          "| system ms / step | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for keep, r in result.items():
        print(f"| {keep} | {r['ms']:.0f} | {r['faults']:.0f} | {r['system_ms']:.0f} "
              f"| {r['rss_mib']:.0f} |")
    off, on = result["false"], result["true"]
    print(f"\nstep time true / false: {on['ms'] / off['ms']:.3f}; page faults "
          f"{off['faults']:.0f} -> {on['faults']:.0f}; system time "
          f"{off['system_ms']:.0f} -> {on['system_ms']:.0f} ms a step")


if __name__ == "__main__":
    main()
