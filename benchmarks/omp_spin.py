"""What OpenMP's spin-waiting costs when two multi-threaded CPU processes share the cores (as the
test suite's two workers do, or a mining job beside a training run), and what a shorter spin
costs a process that has the machine to itself.

    python benchmarks/omp_spin.py [--threads 2] [--steps 4] [--rounds 2] [--tiny]

An idle OpenMP thread spins (libgomp: 300,000 turns by default) before it sleeps, so that the
next parallel region starts at once. Alone that pays; beside another busy process the spinning
threads hold cores the other one needs, and each process waits for its own descheduled threads.
Each setting runs a worker process alone, then two side by side (started together), each doing
``--steps`` training steps (forward and backward) of a MiniLM-shaped encoder (6 layers, hidden
384, 12 heads, FFN 1536; 16 sequences x 128 tokens; torch's own layers, so the script times
OpenMP and not megarank) on ``--threads`` threads, after one warm-up step. Settings are taken in
turns, round after round, so the machine's drift weighs on each alike; the medians are printed.
``--tiny`` runs a 2-layer, hidden-64 encoder on 4 x 32 tokens instead (the script's own check).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

GEOMETRY = {  # --tiny -> (name, layers, hidden, heads, ffn, rows, tokens)
    False: ("MiniLM-shaped", 6, 384, 12, 1536, 16, 128),
    True: ("tiny", 2, 64, 4, 128, 4, 32),
}
OMP_KNOBS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
SETTINGS = {  # name -> environment
    "libgomp's default (300,000 turns)": {},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def worker(threads: int, steps: int, tiny: bool) -> None:
    """Time ``steps`` training steps after a warm-up one; print seconds per step."""
    import torch

    print(" ".join(f"{k}={os.environ.get(k, '')}" for k in OMP_KNOBS), flush=True)
    _, layers, hidden, heads, ffn, rows, tokens = GEOMETRY[tiny]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(hidden, heads, ffn, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    x = torch.randn(rows, tokens, hidden)
    model(x).sum().backward()
    start = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    print(f"{(time.perf_counter() - start) / steps:.4f}", flush=True)


def run(env: dict[str, str], copies: int, threads: int, steps: int,
        tiny: bool) -> list[float]:
    """Seconds per step of each of ``copies`` workers started together."""
    full = {k: v for k, v in os.environ.items() if k not in OMP_KNOBS}
    full.update(env, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--steps",
           str(steps), *["--tiny"] * tiny]
    procs = [subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed with {env or 'the default settings'}")
    seen = " ".join(f"{k}={env.get(k, '')}" for k in OMP_KNOBS)
    for o in out:
        if o.splitlines()[0] != seen:
            raise SystemExit(f"a worker ran with {o.splitlines()[0]!r}, not {seen!r}")
    return [float(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer, hidden-64 encoder on 4 x 32 tokens (a check of the script)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.threads, args.steps, args.tiny)
        return
    alone: dict[str, list[float]] = {name: [] for name in SETTINGS}
    paired: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            alone[name] += run(env, 1, args.threads, args.steps, args.tiny)
            paired[name].append(statistics.mean(run(env, 2, args.threads, args.steps,
                                                    args.tiny)))
    geometry, layers, hidden, _, _, rows, tokens = GEOMETRY[args.tiny]
    print(f"{geometry} encoder ({layers} layers, hidden {hidden}), {rows} x {tokens} tokens, "
          f"fwd+bwd, {args.threads} threads a process, "
          f"{os.cpu_count()} cores; s per step, median of {args.rounds} rounds\n")
    print("| setting | alone | two side by side (each) | side by side / alone |")
    print("|---|---|---|---|")
    for name in SETTINGS:
        a, p = statistics.median(alone[name]), statistics.median(paired[name])
        print(f"| {name} | {a:.3g} | {p:.3g} | {p / a:.2f} |")


if __name__ == "__main__":
    main()
