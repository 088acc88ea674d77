"""What the CPU training step's dropout and finite check cost, before and after megarank's own
versions, on MiniLM's shapes (one micro-batch of 2 groups x 8 pairs x 128 tokens, 12 heads of
32, hidden 384, 22.7M gradients), one thread, forward and backward.

    python benchmarks/cpu_dropout.py [--repeats 7] [--dtype bf16|fp32]

Rows, each timed in this process with the reference and megarank's version interleaved (so the
machine's speed, which moves by 15% from minute to minute on a shared 2-core virtual machine,
weighs on both alike), median of ``--repeats`` rounds:

- attention dropout (p 0.1): ``F.scaled_dot_product_attention(dropout_p=0.1)`` (its math kernel
  draws a 32-bit number per probability) against ``megarank.models.attention.attend`` (16-bit
  draws, megarank.models.dropout);
- residual dropout (p 0.1) of one layer's bias-dropout-add: megatron's (torch's dropout) against
  ``megarank.models.dropout.get_bias_dropout_add``;
- the attention dropout's mask as 0/1 of the activation's dtype (once forward, once backward a
  layer): torch's bool-to-float conversion against the mask's bytes read as uint8
  (``megarank.models.dropout._as``);
- the gradient finite check: ``isfinite(g).all()`` against ``isfinite(g.sum())``
  (``megarank.parallel.megatron.grads_finite_tensor``).

The last column is what a step saves: the row's saving times its calls per step (6 layers:
6 attention calls, 12 residual adds, 12 mask conversions; one check), per rank.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add as megatron_bda

from megarank.models.attention import attend
from megarank.models.dropout import _as, get_bias_dropout_add, kept_mask

B, HEADS, S, D, HIDDEN, GRADS, LAYERS = 16, 12, 128, 32, 384, 22_700_000, 6


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def attention_case(dtype: torch.dtype) -> tuple[Callable, Callable]:
    q, k, v = (torch.randn(B, HEADS, S, D, dtype=dtype, requires_grad=True) for _ in range(3))
    allowed = torch.ones(B, 1, 1, S, dtype=torch.bool)
    allowed[: B // 4, ..., S - 30:] = False

    def sdpa() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=0.1).sum().backward()

    def ours() -> None:
        attend(q, k, v, attn_mask=allowed, dropout_p=0.1, scale=D ** -0.5).sum().backward()

    return sdpa, ours


def residual_case(dtype: torch.dtype) -> tuple[Callable, Callable]:
    x = torch.randn(S, B, HIDDEN, dtype=dtype, requires_grad=True)
    bias = torch.randn(HIDDEN, dtype=dtype, requires_grad=True)
    residual = torch.randn(S, B, HIDDEN, dtype=dtype, requires_grad=True)
    reference, mine = megatron_bda(True, False), get_bias_dropout_add(True, False)

    def run(bda: Callable) -> Callable:
        return lambda: bda((x, bias), residual, 0.1).sum().backward()

    return run(reference), run(mine)


def mask_case(dtype: torch.dtype) -> tuple[Callable, Callable]:
    kept, _ = kept_mask((B, HEADS, S, S), 0.1)
    return lambda: kept.to(dtype), lambda: _as(kept, dtype)


def finite_case() -> tuple[Callable, Callable]:
    g = torch.randn(GRADS)
    return (lambda: bool(torch.isfinite(g).all()),
            lambda: bool(torch.isfinite(g.sum(dtype=torch.float32))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cases = [
        ("attention dropout, fwd+bwd", *attention_case(dtype), LAYERS),
        ("residual dropout-add, fwd+bwd", *residual_case(dtype), 2 * LAYERS),
        ("attention dropout mask to 0/1", *mask_case(dtype), 2 * LAYERS),
        ("gradient finite check (fp32)", *finite_case(), 1),
    ]
    print(f"torch {torch.__version__}, 1 thread, {args.dtype}, median of {args.repeats}\n")
    print("| operation | reference ms | megarank ms | megarank / reference "
          "| calls per step | saved per step ms |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for name, reference, mine, calls in cases:
        reference(), mine()  # warm
        ref_t, my_t = [], []
        for _ in range(args.repeats):
            ref_t.append(timed(reference))
            my_t.append(timed(mine))
        r, m = statistics.median(ref_t) * 1e3, statistics.median(my_t) * 1e3
        total += (r - m) * calls
        print(f"| {name} | {r:.1f} | {m:.1f} | {m / r:.2f} | {calls} | {(r - m) * calls:.0f} |")
    print(f"\nsaved per step and rank: {total:.0f} ms")


if __name__ == "__main__":
    main()
