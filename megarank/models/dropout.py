"""Dropout on the CPU with 16-bit random numbers.

torch's CPU dropout draws a 32-bit random number per element from its Mersenne Twister (and SDPA's
attention dropout does the same through its math kernel); ``benchmarks/cpu_dropout.py`` measures
what the draws below save on MiniLM's shapes. Here four 16-bit numbers come from one 64-bit draw of the same
generator (so seeding, megatron's RNG tracker and checkpointed RNG state work as before), the rate
is rounded to 1/65536 and the kept values are scaled by that rounded rate, so the expectation is
exact. Flash attention does the same with 8 bits on the GPU. CUDA keeps torch's kernels.

The mask is kept as bool (1 byte an element) where torch's CPU dropout keeps a float noise tensor
of the activation's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.fusions.fused_bias_dropout import (
    get_bias_dropout_add as megatron_bias_dropout_add,
)


def _draws(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform 16-bit integers of ``shape`` (int16), four per 64-bit draw of the CPU generator."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    return bits.view(torch.int16)[:n].view(shape)


def kept_mask(shape: tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A bool mask of ``shape``, True where a value is kept, from 16-bit uniform numbers (four
    per 64-bit draw of the current CPU generator), and the rate it was drawn at: ``p`` rounded to
    1/65536. A product with it is one pass (and its backward another), where a masked fill of a
    copy is two."""
    threshold = round(p * 65536)
    return _draws(shape) >= threshold - 32768, threshold / 65536


def _as(kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 of ``dtype``, read through its bytes as uint8: torch's CPU conversion
    from bool takes a slow path, from uint8 a vectorised one, to the same values (MiniLM's
    attention mask, fp32: 2.3 against 0.8 ms, ``benchmarks/cpu_dropout.py``)."""
    return kept.view(torch.uint8).to(dtype)


class _TimesKept(torch.autograd.Function):
    """``x * kept`` for a bool ``kept``: the product taken with a float copy of the mask, forward
    and backward, the bool mask saved (1 byte an element). torch's own product with a bool
    tensor and a masked fill are each about twice as slow on the CPU as a float product, and
    saving the float copy would keep 4 bytes an element."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kept)
        return x * _as(kept, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kept,) = ctx.saved_tensors
        return grad * _as(kept, grad.dtype), None


def times_kept(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``x`` with the values where ``kept`` (bool, x's shape) is False set to 0."""
    return _TimesKept.apply(x, kept)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with :func:`kept_mask` on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return torch.nn.functional.dropout(x, p, training=True)
    kept, rate = kept_mask(tuple(x.shape), p)
    return (x * kept).mul_(1.0 / (1.0 - rate))


def get_bias_dropout_add(training: bool, fused: bool) -> Callable:
    """megatron's ``get_bias_dropout_add`` (the transformer layer's residual add after the
    attention and the MLP), with :func:`dropout` when training on the CPU."""
    megatron_bda = megatron_bias_dropout_add(training, fused)

    def bias_dropout_add(x_with_bias: tuple[torch.Tensor, torch.Tensor | None],
                         residual: torch.Tensor, prob: float) -> torch.Tensor:
        x, bias = x_with_bias
        if not training or prob == 0.0 or x.device.type != "cpu":
            return megatron_bda(x_with_bias, residual, prob)
        residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
        if bias is not None:
            x = x + bias
        kept, rate = kept_mask(tuple(x.shape), prob)
        # residual + x * kept / (1 - rate), in one pass
        return torch.addcmul(residual, x, kept, value=1.0 / (1.0 - rate))  # keeps the bool mask

    return bias_dropout_add
