"""DoRA (weight-decomposed LoRA) on megatron's tensor-parallel linears, as PEFT computes it.

DoRA adds to LoRA's (A, B) pairs a trained magnitude ``m`` per output row ``o`` of each Hugging
Face projection, and computes

    y = m / n * (W x + s B A x) + bias,   n[o] = || W[o, :] + s (B A)[o, :] ||_2,   s = alpha / r

with ``n`` recomputed from the current weights in every forward and detached from the graph
(PEFT ``peft/tuners/lora/dora.py``, after section 4.3 of the DoRA paper: the norm gets no
gradient). ``m`` starts at ``n`` with B = 0, i.e. the norm of W's rows, so the initial model is
the base. As PEFT does, with the adapters' dropout active (training, ``peft.dropout > 0``) the
rescaling term reads the dropped input: ``y = W x + bias + (m / n - 1) W x' + m / n s B A x'``
with ``x' = dropout(x)``; without it ``W x`` is the layer's own output less its bias.

How the row norm is formed under tensor parallelism:

- column-parallel (``linear_qkv``, ``linear_fc1``): each rank holds whole output rows of W (and
  the matching rows of B, A being replicated), so ``n`` of its rows is computed locally; ``m``
  is split like B's rows (``m{i}`` ``[out_i / tp]``).
- row-parallel (``linear_proj``, ``linear_fc2``): each rank holds a slice of the input columns of
  W and of A, so ``n[o]^2`` is the sum over ranks of the squared norms of the local slices of
  row o: those are summed in fp32 over the tensor-parallel group (one all-reduce of ``[out]``
  values, detached) and then square-rooted. ``m`` (``[out]``) is replicated, like B.

In training the weights change only at the optimizer step, so a step's micro-batches (and a
recomputed forward) share one norm per adapter: it is cached while the module trains, keyed on
the weights' generation (:func:`weights_changed`, which the training step calls after every
optimizer step) and on the in-place versions of W, A and B; scoring (eval mode) always
recomputes it.

The fused linears (q, k, v in ``linear_qkv``; gate and up in a gated ``linear_fc1``) keep one
magnitude vector per HF projection, laid out into the fused rows by the same interleaving as the
adapters' outputs, so that a DoRA adapter is exactly a PEFT DoRA adapter in both directions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from megarank.models.lora import LoraAdapter, adapters, add_adapters, transformer_layers

_generation = 0
"""How many times the weights of a training model may have changed (optimizer steps, loads)."""


def weights_changed() -> None:
    """Say that model weights may have changed outside autograd's notice (an optimizer step
    writes parameters through ``.data``, which no version counter sees): every cached DoRA norm
    is recomputed at its next use."""
    global _generation
    _generation += 1


class DoraAdapter(LoraAdapter):
    """LoRA's (A, B) pairs of one target linear plus a magnitude ``m{i}`` per projection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dtype = self.a0.dtype
        for i, p in enumerate(self.parts):
            rows = p.out_features // self.tp_size if self.parallel == "column" else p.out_features
            m = torch.nn.Parameter(torch.ones(rows, dtype=dtype))
            if self.parallel == "column":
                tensor_parallel.set_tensor_model_parallel_attributes(m, True, 0, 1)
            self.register_parameter(f"m{i}", m)
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None

    def training_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`weight_norm`, computed once per weights generation while training (module
        docstring); in eval mode, every call."""
        if not self.training:
            self._norm_cache = None
            return self.weight_norm(weight)
        key = (_generation, weight.data_ptr(), weight._version,
               *((a._version, b._version) for a, b in self.pairs()))
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self.weight_norm(weight))
        return self._norm_cache[1]

    def magnitudes(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"m{i}") for i in range(len(self.parts))]

    def unfused(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`fused` for a vector of this rank's fused rows."""
        if self.layout == "copy":
            return [rows]
        if self.layout == "gate_up":
            return list(rows.chunk(2))
        groups, per_group, d = self.geometry
        blocks = rows.reshape(groups // self.tp_size, (per_group + 2) * d)
        q, k, v = blocks.split([per_group * d, d, d], dim=1)
        return [q.reshape(-1), k.reshape(-1), v.reshape(-1)]

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``|| W + s B A ||`` of this rank's fused output rows, in fp32 (detached); reduced over
        the tensor-parallel group for a row-parallel linear."""
        delta_t = [a.float().t() @ b.float().t() for a, b in self.pairs()]  # [in_local, out_i]
        full = weight.float() + self.scale * self.fused(delta_t).t()  # [out_local, in_local]
        squares = full.square().sum(dim=1)
        if self.parallel == "row" and self.tp_size > 1:
            torch.distributed.all_reduce(
                squares, group=parallel_state.get_tensor_model_parallel_group())
        return squares.sqrt()

    @torch.no_grad()
    def reset_magnitudes(self, weight: torch.Tensor) -> None:
        """``m = || W + s B A ||`` row by row: the adapted model scores as the LoRA one."""
        for m, n in zip(self.magnitudes(), self.unfused(self.weight_norm(weight)), strict=True):
            m.copy_(n.to(m.dtype))

    def set_magnitude(self, i: int, full: torch.Tensor) -> None:
        """Projection ``i``'s magnitude from its full (unsplit) vector."""
        m = getattr(self, f"m{i}")
        if self.parallel == "column" and self.tp_size > 1:
            full = full.chunk(self.tp_size)[self.tp_rank]
        with torch.no_grad():
            m.copy_(full)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """As LoRA's, with the magnitudes split as they are (column) or replicated (row)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axes = {}
        for i in range(len(self.parts)):
            if self.parallel == "column":
                axes[f"b{i}"] = axes[f"m{i}"] = 0
            else:
                axes[f"a{i}"] = 1
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets)


def dora_hook(adapter: DoraAdapter, linear: torch.nn.Module):
    """The forward hook that turns a megatron linear's output into DoRA's (module docstring)."""

    def apply_dora(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        out, bias = output
        x = args[0]
        dropped = adapter.dropout(x)
        dropout_active = adapter.training and not isinstance(adapter.dropout, torch.nn.Identity)
        magnitude = adapter.fused(adapter.magnitudes())
        factor = magnitude / adapter.training_norm(linear.weight).to(magnitude.dtype)  # [out_local]
        if not dropout_active:  # as PEFT: W x is the layer's output less the bias it added
            added = None if linear.skip_bias_add else getattr(linear, "bias", None)
            wx = out if added is None else out - added
        else:
            wx = F.linear(dropped, linear.weight)
            if adapter.parallel == "row":
                wx = tensor_parallel.reduce_from_tensor_model_parallel_region(wx)
        lora = adapter.lora_output(dropped)
        factor = factor.to(out.dtype)
        return out + (factor - 1) * wx + factor * lora.to(out.dtype), bias
    return apply_dora


def reset_magnitudes(model: torch.nn.Module) -> int:
    """Set every DoRA magnitude of this stage to ``|| W + s B A ||`` of its rows from the weights
    the model holds now: after the base weights are loaded (an HF import, ``model.init_from``),
    so that the adapted model starts equal to its base. Collective over the tensor-parallel group
    (row-parallel norms). Returns the number of adapters reset."""
    weights_changed()
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    count = 0
    for linear_name, _, adapter in adapters(inner):
        if isinstance(adapter, DoraAdapter):
            adapter.reset_magnitudes(_linear(inner, linear_name).weight)
            count += 1
    return count


def _linear(model: torch.nn.Module, global_name: str) -> torch.nn.Module:
    """A linear by the global name :func:`megarank.models.lora.adapters` gives it."""
    for layer_name, layer in transformer_layers(model):
        if global_name.startswith(layer_name + "."):
            return layer.get_submodule(global_name[len(layer_name) + 1:])
    raise KeyError(global_name)


def add_dora(model: torch.nn.Module, cfg: Any, tp_rank: int, tp_size: int) -> int:
    """:func:`megarank.models.lora.add_adapters` with DoRA adapters and their forward hook.
    The magnitudes are set by :func:`reset_magnitudes` once the base is loaded and the model is
    on its device (their row norms are collective under TP)."""
    return add_adapters(model, cfg, tp_rank, tp_size, DoraAdapter, dora_hook)
