"""The word embedding's gradient added straight into megatron's gradient buffer, on the CPU.

torch's embedding backward builds a dense [vocab, hidden] gradient (a zero fill of the whole
table, then the rows of the micro-batch's tokens added in), and megatron's DDP hook then adds that
table into ``main_grad``, which ``zero_grad_buffer`` zeroed at the start of the step. For MiniLM
(30,592 x 384 fp32) the fill alone was 20.5 ms of a 1.3 s one-thread step, and the add another
full pass. Here the backward adds the tokens' rows into ``main_grad`` itself (``index_add_``, in
main_grad's dtype) and says so through megatron's ``grad_added_to_main_grad`` contract (the one
its fused weight-gradient accumulation uses), so the hook adds nothing more.

Only where every gradient of the weight comes through this lookup: not a table tied to an output
layer in the same stage, not tensor-parallel (megatron's masked lookup stays), and only on the
CPU (CUDA's embedding backward is fast and deterministic; ``index_add_`` there is atomic).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding


class _RowsIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main = weight.main_grad
        main.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(main.dtype))
        weight.grad_added_to_main_grad = True
        # What megatron's fused accumulation returns too: a gradient the DDP hook sees and
        # drops (never written, so never paged in).
        return None, torch.empty_like(weight)


def rows_into_main_grad(embedding: VocabParallelEmbedding) -> None:
    """Route ``embedding``'s training lookups through :class:`_RowsIntoMainGrad` whenever the
    weight has megatron's ``main_grad`` (the model is wrapped in DDP), grad is enabled and the
    ids are on the CPU; otherwise megatron's own forward. A table split over TP ranks (or
    reduce-scattered) keeps megatron's masked lookup: nothing is installed. Installing twice
    changes nothing."""
    if (installed(embedding) or embedding.tp_group.size() > 1
            or embedding.reduce_scatter_embeddings):
        return
    original = embedding.forward

    def forward(input_: torch.Tensor) -> torch.Tensor:
        weight = embedding.weight
        if (input_.device.type != "cpu" or not torch.is_grad_enabled()
                or not weight.requires_grad or not hasattr(weight, "main_grad")):
            return original(input_)
        return _RowsIntoMainGrad.apply(input_, weight)

    embedding.forward = forward


def installed(embedding: VocabParallelEmbedding) -> bool:
    """Whether :func:`rows_into_main_grad` routes ``embedding``'s lookups."""
    return "forward" in vars(embedding)


def remove(embedding: VocabParallelEmbedding) -> None:
    """Back to megatron's own lookup (``benchmarks/cpu_step_ab.py`` and the tests compare the
    two); :func:`rows_into_main_grad` installs the direct path again."""
    vars(embedding).pop("forward", None)


def install(backbone: torch.nn.Module) -> None:
    """:func:`rows_into_main_grad` on the backbone's word embedding. Not for a table tied to an
    output layer (another gradient of the same weight in this stage, which the DDP hook would
    then drop): the caller leaves those out."""
    for module in backbone.modules():
        if isinstance(module, VocabParallelEmbedding):
            rows_into_main_grad(module)
