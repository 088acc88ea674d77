"""What a half-precision matmul costs on this CPU against fp32, and whether megarank's start-up
note (megarank.parallel.runtime.cpu_half_precision_note) is given here.

    python benchmarks/cpu_precision.py [--repeats 7] [--shapes 1024x1024x1024,2048x384x1536]

oneDNN computes bf16 (fp16) matmuls natively only on CPUs with AVX512-BF16 or AMX (AVX512-FP16 or
AMX-FP16); elsewhere they are emulated. Each shape M x K x N is an [M, K] @ [K, N] product, one
thread, fp32, bf16 and fp16 timed in turn within each round (so the machine's drift weighs on all
alike), median of ``--repeats`` rounds. 2048 x 384 x 1536 is MiniLM's feed-forward input
projection for one micro-batch of 16 pairs x 128 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megarank.parallel.runtime import cpu_half_precision_note

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shape(text: str) -> tuple[int, int, int]:
    m, k, n = (int(x) for x in text.split("x"))
    return m, k, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="1024x1024x1024,2048x384x1536",
                    help="comma-separated M x K x N")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, 1 thread, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN native bf16 "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, native fp16 "
          f"{torch.ops.mkldnn._is_mkldnn_fp16_supported()}, median of {args.repeats}")
    for precision in ("bf16", "fp16"):
        print(f"megarank's start-up note for {precision}: "
              f"{'given' if cpu_half_precision_note(precision, cpu) else 'none'}")
    print("\n| M x K x N | fp32 ms | bf16 ms | fp16 ms | bf16 / fp32 | fp16 / fp32 |")
    print("|---|---|---|---|---|---|")
    for text in args.shapes.split(","):
        m, k, n = shape(text)
        a, b = torch.randn(m, k), torch.randn(k, n)
        operands = {name: (a.to(dt), b.to(dt)) for name, dt in DTYPES.items()}
        times: dict[str, list[float]] = {name: [] for name in DTYPES}
        for x, y in operands.values():
            x @ y  # warm
        for _ in range(args.repeats):
            for name, (x, y) in operands.items():
                start = time.perf_counter()
                x @ y
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"| {m} x {k} x {n} | {ms['fp32']:.2f} | {ms['bf16']:.2f} | {ms['fp16']:.2f} "
              f"| {ms['bf16'] / ms['fp32']:.1f} | {ms['fp16'] / ms['fp32']:.1f} |")


if __name__ == "__main__":
    main()
