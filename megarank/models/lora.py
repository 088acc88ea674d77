"""LoRA adapters on megatron's tensor-parallel linears.

Each target linear ``W`` (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2`` of every
layer) computes ``W x + (alpha / r) * B A x``. A fused megatron linear gets one (A, B) pair per
Hugging Face projection it is made of (q, k and v of ``linear_qkv``; gate and up of a gated
``linear_fc1``), so that an adapter is exactly a PEFT adapter of the HF model, in both directions.

Tensor parallelism follows the base weight:

- column-parallel (``linear_qkv``, ``linear_fc1``): A ``[r, in]`` is replicated on the TP ranks,
  B ``[out / tp, r]`` is split like the weight's output rows. ``A x`` is the same on every rank;
  its gradient is summed over the ranks (each holds part of B) by megatron's
  ``copy_to_tensor_model_parallel_region``. The per-projection outputs are laid out like the fused
  weight's local rows (the same interleaving the HF import applies to the weights).
- row-parallel (``linear_proj``, ``linear_fc2``): A ``[r, in / tp]`` is split like the weight's
  input columns and B ``[out, r]`` replicated; the partial ``A x`` are summed over the ranks by
  ``reduce_from_tensor_model_parallel_region``, as the base layer sums its partial outputs.

Adapters are initialised from full tensors seeded by their name (PEFT's rule: A Kaiming-uniform,
B zero), then split, so every layout starts from the same adapters. The base weights are frozen
(``requires_grad=False``): megatron's DDP buckets, gradient norm and optimizer see only the
adapters and, with ``peft.train_head``, the classifier head.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel

# The megatron linears adapters can target, and how each is split over tensor-parallel ranks.
PARALLEL = {"linear_qkv": "column", "linear_fc1": "column",
            "linear_proj": "row", "linear_fc2": "row"}
_OWNER = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
          "linear_fc1": "mlp", "linear_fc2": "mlp"}
ADAPTER = "lora"  # the adapter module's name under its linear: ``...linear_qkv.lora.a0``


@dataclass(frozen=True)
class Projection:
    """One (A, B) pair of a target: the HF projection it adapts and its full shape."""

    in_features: int
    out_features: int


def projections(target: str, model_cfg: Any) -> tuple[tuple[Projection, ...], str]:
    """The HF projections a megatron linear is made of, and how their outputs are combined into
    the fused layout (``qkv``, ``gate_up`` or ``copy``: ``megarank.checkpoint.hf_mappings``)."""
    m = model_cfg
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    d = m.head_dim or m.hidden_size // heads
    h, ffn = m.hidden_size, m.ffn_hidden_size
    gated = m.family == "gpt" and m.gated_linear_unit
    if target == "linear_qkv":
        return (Projection(h, heads * d), Projection(h, groups * d), Projection(h, groups * d)), "qkv"
    if target == "linear_proj":
        return (Projection(heads * d, h),), "copy"
    if target == "linear_fc1":
        if gated:
            return (Projection(h, ffn), Projection(h, ffn)), "gate_up"
        return (Projection(h, ffn),), "copy"
    if target == "linear_fc2":
        return (Projection(ffn, h),), "copy"
    raise ValueError(f"peft.targets: {target!r} is not one of {', '.join(PARALLEL)}")


def _seeded(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def initial_a(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's default A: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=_seeded(name, seed)) * 2 - 1) * bound


class LoraAdapter(torch.nn.Module):
    """The adapters of one target linear on this TP rank: ``a{i}``, ``b{i}`` per projection."""

    def __init__(self, parallel: str, parts: tuple[Projection, ...], layout: str, rank: int,
                 alpha: float, dropout: float, tp_rank: int, tp_size: int, geometry: tuple,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.parallel, self.layout, self.rank_r = parallel, layout, rank
        self.scale = alpha / rank
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.geometry = geometry  # (query groups, heads per group, head dim) for ``qkv``
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.parts = parts
        for i, p in enumerate(parts):
            if parallel == "column":
                a = torch.nn.Parameter(torch.zeros(rank, p.in_features, dtype=dtype))
                b = torch.nn.Parameter(torch.zeros(p.out_features // tp_size, rank, dtype=dtype))
                tensor_parallel.set_tensor_model_parallel_attributes(b, True, 0, 1)
            else:
                a = torch.nn.Parameter(torch.zeros(rank, p.in_features // tp_size, dtype=dtype))
                b = torch.nn.Parameter(torch.zeros(p.out_features, rank, dtype=dtype))
                tensor_parallel.set_tensor_model_parallel_attributes(a, True, 1, 1)
            self.register_parameter(f"a{i}", a)
            self.register_parameter(f"b{i}", b)

    def pairs(self) -> Iterator[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        for i in range(len(self.parts)):
            yield getattr(self, f"a{i}"), getattr(self, f"b{i}")

    def local(self, full: torch.Tensor, which: str) -> torch.Tensor:
        """This rank's part of a full A (``a``) or B (``b``)."""
        split = (which == "b") if self.parallel == "column" else (which == "a")
        if not split or self.tp_size == 1:
            return full
        dim = 0 if which == "b" else 1
        return full.chunk(self.tp_size, dim)[self.tp_rank]

    def set_full(self, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Projection ``i``'s adapters from full (unsplit) tensors."""
        pa, pb = getattr(self, f"a{i}"), getattr(self, f"b{i}")
        with torch.no_grad():
            pa.copy_(self.local(a, "a"))
            pb.copy_(self.local(b, "b"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters' output [s, b, out / tp] (column) or [s, b, out] (row) for input x."""
        return self.lora_output(self.dropout(x))

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s B A x`` in the fused linear's local layout, for an input already dropped out."""
        outs = []
        for a, b in self.pairs():
            low = F.linear(x, a)
            if self.parallel == "column":
                low = tensor_parallel.copy_to_tensor_model_parallel_region(low)
            else:
                low = tensor_parallel.reduce_from_tensor_model_parallel_region(low)
            outs.append(F.linear(low, b))
        return self.fused(outs) * self.scale

    def fused(self, per_part: list[torch.Tensor]) -> torch.Tensor:
        """Per-projection tensors (last dim: this rank's rows of each) in the fused linear's
        local row order."""
        if self.layout == "copy":
            return per_part[0]
        if self.layout == "gate_up":  # megatron's fc1 shard: [this rank's gate; its up]
            return torch.cat(per_part, dim=-1)
        # megatron's QKV rows: [group][q heads of the group, k, v]
        groups, per_group, d = self.geometry
        local = groups // self.tp_size
        lead = per_part[0].shape[:-1]
        q = per_part[0].reshape(*lead, local, per_group * d)
        k = per_part[1].reshape(*lead, local, d)
        v = per_part[2].reshape(*lead, local, d)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """Checkpoint entries split as the parameters are (megatron's distributed format)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axes = {}
        for i in range(len(self.parts)):
            axes[f"b{i}" if self.parallel == "column" else f"a{i}"] = (
                0 if self.parallel == "column" else 1)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets)


def _hook(adapter: LoraAdapter):
    def add_adapter(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        out, bias = output
        return out + adapter(args[0]).to(out.dtype), bias
    return add_adapter


def _input_needs_grad(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


def _with_adapter_state(linear: torch.nn.Module, adapter: LoraAdapter):
    """The linear's sharded_state_dict with the adapter's entries split as the adapter is."""
    original = linear.sharded_state_dict

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        sd = original(prefix, sharded_offsets, metadata)
        for key in [k for k in sd if k.startswith(f"{prefix}{ADAPTER}.")]:
            del sd[key]
        sd.update(adapter.sharded_state_dict(f"{prefix}{ADAPTER}.", sharded_offsets, metadata))
        return sd
    return sharded_state_dict


def transformer_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(global name, layer) of this stage's transformer layers: the name carries the layer's
    index in the whole model (``backbone.decoder.layers.5`` on a later pipeline stage)."""
    name = "decoder" if hasattr(model.backbone, "decoder") else "encoder"
    for layer in getattr(model.backbone, name).layers:
        yield f"backbone.{name}.layers.{layer.layer_number - 1}", layer


def adapters(model: torch.nn.Module) -> Iterator[tuple[str, str, LoraAdapter]]:
    """(global linear name, target, adapter) of every adapter on this stage."""
    for layer_name, layer in transformer_layers(model):
        for target, owner in _OWNER.items():
            linear = getattr(getattr(layer, owner), target, None)
            adapter = getattr(linear, ADAPTER, None) if linear is not None else None
            if isinstance(adapter, LoraAdapter):
                yield f"{layer_name}.{owner}.{target}", target, adapter


def add_adapters(model: torch.nn.Module, cfg: Any, tp_rank: int, tp_size: int,
                 kind: type[LoraAdapter] = LoraAdapter, make_hook: Any = None) -> int:
    """Freeze ``model`` (a CrossEncoder stage) and put LoRA adapters on its target linears.

    Returns the number of trainable parameters on this rank. The head stays trainable with
    ``peft.train_head`` (a yes/no head, which is the vocabulary, never). Call before DDP wraps
    the model: DDP allocates gradient buffers for trainable parameters only. ``kind`` and
    ``make_hook(adapter, linear)`` (the forward hook; default: add the adapters' output) are how
    :func:`megarank.models.dora.add_dora` puts DoRA adapters on instead.
    """
    peft, m = cfg.peft, cfg.model
    for p in model.parameters():
        p.requires_grad_(False)
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    geometry = (groups, heads // groups, m.head_dim or m.hidden_size // heads)
    dtype = next(model.parameters()).dtype
    for layer_name, layer in transformer_layers(model):
        for target in peft.targets:
            owner = getattr(layer, _OWNER[target])
            linear = getattr(owner, target)
            parts, layout = projections(target, m)
            adapter = kind(PARALLEL[target], parts, layout, peft.rank, peft.alpha,
                           peft.dropout, tp_rank, tp_size, geometry, dtype)
            name = f"{layer_name}.{_OWNER[target]}.{target}"
            for i, p in enumerate(parts):
                a = initial_a(f"{name}.{ADAPTER}.a{i}", (peft.rank, p.in_features),
                              cfg.trainer.seed)
                adapter.set_full(i, a, torch.zeros(p.out_features, peft.rank))
            linear.add_module(ADAPTER, adapter)
            linear.register_forward_hook(
                _hook(adapter) if make_hook is None else make_hook(adapter, linear))
            linear.sharded_state_dict = _with_adapter_state(linear, adapter)
    embedding = getattr(model.backbone, "embedding", None) or getattr(
        model.backbone, "embeddings", None)
    if embedding is not None:
        # With the embeddings frozen, the first layer's input needs no gradient, and megatron's
        # (reentrant) activation recompute would then run no backward through the layers and
        # leave every adapter's gradient zero. The input is marked to need one.
        embedding.register_forward_hook(_input_needs_grad)
    if peft.train_head and cfg.pair.head == "classifier" and model.head is not None:
        for p in model.head.parameters():
            p.requires_grad_(True)
    if peft.method == "qlora":
        quantize_base(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class QuantizedWeight(torch.nn.Module):
    """A frozen linear weight stored 4-bit (NF4, blocks of 64, as QLoRA defines it) through
    bitsandbytes; ``matmul`` dequantizes block by block inside bitsandbytes' autograd function,
    which keeps the 4-bit tensor (not a dequantized copy) for backward."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        import bitsandbytes.functional as bnbf

        packed, self.quant_state = bnbf.quantize_4bit(weight.detach().float().contiguous(),
                                                      blocksize=64, quant_type="nf4")
        self.register_buffer("packed", packed, persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.packed.t(), quant_state=self.quant_state)

    def _apply(self, fn, recurse=True):  # moving to a device moves the quantization state
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)  # in place
        return self


def _quantized_forward(linear: torch.nn.Module, parallel: str):
    """A megatron linear's forward over its 4-bit weight: the same TP communication (copy to /
    reduce from the TP region) and bias handling (``skip_bias_add``) as the layer's own."""

    def forward(input_: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None):
        x = input_
        if parallel == "column":
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        out = linear.weight_4bit.matmul(x)
        if parallel == "row":
            out = tensor_parallel.reduce_from_tensor_model_parallel_region(out)
        bias = getattr(linear, "bias", None)
        if bias is not None and not linear.skip_bias_add:
            return out + bias, None
        return out, bias
    return forward


def quantize_base(model: torch.nn.Module) -> int:
    """Store the weights of every transformer linear 4-bit (QLoRA); embeddings, norms and the
    head stay as they are. Returns the bytes of 4-bit storage. Needs bitsandbytes."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("peft.method=qlora stores the base 4-bit through bitsandbytes, which is "
                         "not installed (pip install 'megarank[qlora]')")
    total = 0
    for _, layer in transformer_layers(model):
        for target, owner in _OWNER.items():
            linear = getattr(getattr(layer, owner), target, None)
            if linear is None or getattr(linear, "weight", None) is None:
                continue
            q = QuantizedWeight(linear.weight.data)
            del linear.weight  # the full-precision weight goes; the quantized one computes
            linear.weight = None
            linear.add_module("weight_4bit", q)
            linear.forward = _quantized_forward(linear, PARALLEL[target])
            total += q.packed.numel() * q.packed.element_size()
    return total


def delta_weights(a: list[torch.Tensor], b: list[torch.Tensor], scale: float
                  ) -> list[torch.Tensor]:
    """Full HF-space weight updates ``scale * B_i A_i`` of one target's projections (fp32)."""
    return [scale * (bi.float() @ ai.float()) for ai, bi in zip(a, b, strict=True)]
