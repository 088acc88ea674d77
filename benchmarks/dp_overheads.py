"""What a CPU data-parallel step pays beyond its forward and backward: the gradient collectives
over gloo and the optimizer step, at MiniLM's size (22.7M fp32 parameters).

    python benchmarks/dp_overheads.py [--params 22740482] [--ranks 2] [--repeats 7]

Each rank is a process of one thread (as megarank's CPU runs are), started here. Rows, each the
median of ``--repeats`` timings on rank 0, every one after a barrier:

- all-reduce of the fp32 gradient: what megarank's DDP does each step (its buckets hold the same
  bytes, reduced bucket by bucket);
- reduce-scatter + all-gather: what the distributed optimizer (ZeRO-1,
  ``parallel.use_distributed_optimizer=true``) does instead;
- torch's fused AdamW step over all the parameters (what each rank repeats without ZeRO-1) and
  over 1 / ranks of them (its share with ZeRO-1).

A single process training the same model pays none of the collectives and one optimizer step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after one warm-up, ranks aligned."""
    fn()
    runs = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def adamw_step(n: int) -> Callable[[], None]:
    param = torch.nn.Parameter(torch.randn(n))
    param.grad = torch.randn(n)
    optimizer = torch.optim.AdamW([param], lr=1e-4, fused=True)
    return optimizer.step


def worker(rank: int, ranks: int, store: str, n: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    grad, shard = torch.randn(n), torch.empty(n // ranks)
    rows = [
        ("all-reduce of the fp32 gradient (DDP)", timed(lambda: dist.all_reduce(grad), repeats)),
        ("reduce-scatter + all-gather (ZeRO-1)",
         timed(lambda: (dist.reduce_scatter_single(shard, grad),
                        dist.all_gather_single(grad, shard)), repeats)),
        ("fused AdamW step, all parameters", timed(adamw_step(n), repeats)),
        (f"fused AdamW step, 1/{ranks} of them (ZeRO-1's share)",
         timed(adamw_step(n // ranks), repeats)),
    ]
    if rank == 0:
        print(f"torch {torch.__version__}, {ranks} gloo ranks x 1 thread, {n:,} fp32 parameters "
              f"({n * 4 / 2**20:.0f} MiB of gradient), median of {repeats}\n")
        print("| operation | ms per step |")
        print("|---|---|")
        for name, ms in rows:
            print(f"| {name} | {ms:.1f} |")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=22_740_482,
                    help="parameters (MiniLM with its head: 22,740,481, rounded up to --ranks)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    n = -(-args.params // args.ranks) * args.ranks  # the collectives split it evenly
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "rendezvous")
        mp.spawn(worker, args=(args.ranks, store, n, args.repeats), nprocs=args.ranks)


if __name__ == "__main__":
    main()
