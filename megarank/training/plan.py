"""Per-GPU memory and FLOPs of a training config on N GPUs, worked out before anything is built.

:func:`plan_memory` takes a composed config (``model=hf`` reads only the HF ``config.json``) and
a world size and returns a :class:`MemoryPlan`: for every pipeline stage, the bytes one GPU holds
for weights, gradients, optimizer state (plain and distributed), the activations autograd keeps
for backward (per micro-batch, for each recompute mode, times the micro-batches the pipeline
schedule keeps in flight), plus the FLOPs of a step (``megarank.training.flops``).
:func:`format_plan` prints it as a table and :func:`fit` says whether the largest stage fits a GPU.

Model state, bytes per parameter (Megatron-LM, docs/source/api-guide/dist_optimizer.md, "the
theoretical number of bytes per parameter", d = data-parallel size): ``bf16`` parameters with
``fp32`` gradients 18 (2 weight + 4 main gradient + 4 fp32 main weight + 4 + 4 Adam moments),
``6 + 12/d`` with the distributed optimizer (ZeRO-1); ``fp32`` 16, ``8 + 8/d``. megarank's DDP
reduces gradients in fp32 for bf16 and fp16 alike (``grad_reduce_in_fp32``), so fp16 is counted
as bf16 (18), not as the table's fp16-gradient row (20).

Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), sec. 4: one GPT layer keeps ``s*b*h*(34 + 5*a*s/h)`` bytes (16-bit
activations, 1-byte dropout masks, 4h MLP, unfused softmax); with tensor parallelism t
``s*b*h*(10 + 24/t + 5*a*s/(h*t))``, with sequence parallelism too ``s*b*h/t*(34 + 5*a*s/h)``,
and selective recompute drops the ``5*a*s/h`` term. :func:`korthikanti_layer_bytes` is that
formula and :func:`paper_layer_terms` the paper's layer written as terms (their sum is the
formula, tested). :func:`layer_terms` derives the same kind of sum, term by term, for the layer
megarank builds; on a layer shaped as the paper's it has each of the paper's terms, and differs
only where the kernels differ (tests/unit/test_plan.py lines them up):

- Attention runs through SDPA / flash kernels: without attention dropout no ``[s, s]`` score
  matrix is kept, only the softmax log-sum-exp (``nq`` fp32 per token), so the 5as/h term is 0,
  as under the paper's selective recompute. With attention dropout on the CPU, SDPA's math path
  keeps the probabilities, the dropout mask and the dropped probabilities (3 x ``nq*s`` per
  token, activation dtype).
- Grouped-query attention and RoPE: queries ``nq*d`` and keys ``nkv*d`` (RoPE's outputs); the
  value is a view of the fused QKV output, which it keeps alive whole (``(nq + 2*nkv)*d``, where
  the paper counts V alone, h).
- SwiGLU: the fc1 output (2F: gate and up) and the fc2 input (F); megatron's unfused path (CPU)
  also keeps the SiLU output and a copy of the up branch (2F more). GeLU (BERT): the
  activation's input and output (2F, the paper's 8h at F = 4h).
- Norms keep their input and per-token statistics (fp32, which the paper leaves out). On the CPU
  torch's RMSNorm is composite and computes in fp32: it keeps an fp32 copy of its input and the
  fp32 normalised x; its LayerNorm keeps the statistics in the input's dtype.
- Dropout (hidden_dropout > 0): a mask per dropout, bool (1 byte) on CUDA, a float noise tensor
  of the activation dtype on the CPU.
- Outside the layers: the input ids, an encoder's embedding LayerNorm, the final norm, and a
  head that keeps one pooled state per sequence (the yes/no head its two output-layer rows).

Pipeline: megatron's 1F1B schedule keeps ``min(m, pp - r)`` micro-batches in flight on stage r
(m micro-batches per step), so the first stage holds the most; a stage that is not the last also
keeps each in-flight micro-batch's output until its backward. Recompute (megatron's
``recompute_granularity``): ``selective`` recomputes the core attention, ``full`` keeps each
layer's input only, and re-running one layer in the backward needs that layer's activations
again for a moment (the working set).

The CPU terms are what ``megarank.training.memory`` measures on models built here (tests check
them within 15%, most to the byte); the GPU terms follow the same kernels' saved tensors (TE's
fused norm + linear keeps x and ln_out; megatron's fused SwiGLU its input; flash attention q, k,
v, out, lse) and are not measured on this machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from megarank.config.validate import validate
from megarank.training.flops import forward_flops_breakdown, step_flops

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")
DEVICES = ("cpu", "cuda")
WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
INT64 = 8

# Memory of known cards in GiB, as NVIDIA's datasheets print it (HBM/GDDR capacities are binary:
# the "80 GB" of an H100 is 80 GiB of HBM3). Names match case-insensitively, with or without the
# size when a card comes in one size only: H100 (SXM and PCIe 80 GB; the NVL has 94 GB), H200
# 141 GB, A100 40/80 GB, L40S 48 GB, L4 24 GB, A10 24 GB, B200 180 GB (per GPU of an HGX B200).
GPUS: dict[str, float] = {
    "H100-80GB": 80.0,
    "H100-NVL-94GB": 94.0,
    "H200-141GB": 141.0,
    "A100-80GB": 80.0,
    "A100-40GB": 40.0,
    "L40S-48GB": 48.0,
    "L4-24GB": 24.0,
    "A10-24GB": 24.0,
    "B200-180GB": 180.0,
}
HEADROOM = 0.10
"""Share of a card's memory the plan leaves free: the CUDA context, NCCL's buffers, the caching
allocator's fragmentation and the backward's short-lived gradient tensors (not modelled term by
term)."""


@dataclass(frozen=True)
class Term:
    """One kind of tensor autograd keeps for backward, in one layer (or stage) of one GPU."""

    name: str
    """What it is, e.g. ``fc1 output``."""
    elements: float
    """Elements per token (per position when ``per_position``) on this GPU."""
    width: int
    """Bytes per element."""
    kept: tuple[str, ...] = ("none", "selective")
    """The recompute modes that keep it (``full`` keeps only each layer's input)."""
    per_position: bool = False
    """Counted once per position of the sequence (RoPE tables), not per token of the batch."""
    after_core: bool = False
    """Made after the core attention (projection, MLP): the backward frees it before it
    recomputes the core attention."""

    def bytes(self, sequences: int, length: int) -> float:
        """Bytes for a micro-batch of ``sequences`` x ``length`` tokens."""
        n = length if self.per_position else sequences * length
        return self.elements * self.width * n


@dataclass(frozen=True)
class StagePlan:
    """What one GPU of one pipeline stage holds (every TP and DP rank of a stage holds alike)."""

    stage: int
    """Pipeline rank."""
    layers: int
    """Transformer layers on this stage."""
    params: int
    """Parameters on this GPU (its tensor-parallel shard of the stage)."""
    weights: int
    """Bytes of the weights in the training precision."""
    grads: int
    """Bytes of megatron DDP's gradient buffer (fp32 in every precision)."""
    optim_plain: int
    """Optimizer state with the plain optimizer: Adam's two fp32 moments, plus fp32 main weights
    for bf16/fp16."""
    optim_distributed: int
    """The same sharded over data parallel (ZeRO-1): optim_plain / dp."""
    saved_per_micro_batch: dict[str, int]
    """Activation bytes autograd keeps for one micro-batch on this stage, per recompute mode."""
    working_set: dict[str, int]
    """Bytes a recompute mode needs again for a moment during the backward (one layer re-run)."""
    in_flight: int
    """Micro-batches whose activations the pipeline schedule holds at once on this stage."""
    pipeline_outputs: int
    """Bytes of the in-flight micro-batches' stage outputs kept for the next stage's gradient
    (0 on the last stage)."""

    def activations(self, recompute: str) -> int:
        """Peak activation bytes under ``recompute``: in-flight micro-batches plus the working set
        and the kept pipeline outputs."""
        return (self.in_flight * self.saved_per_micro_batch[recompute]
                + self.working_set[recompute] + self.pipeline_outputs)

    def total(self, recompute: str, distributed_optimizer: bool) -> int:
        """Bytes this GPU needs under a recompute mode and optimizer choice."""
        optim = self.optim_distributed if distributed_optimizer else self.optim_plain
        return self.weights + self.grads + optim + self.activations(recompute)


@dataclass(frozen=True)
class MemoryPlan:
    """The per-GPU memory and the FLOPs of a config on ``world_size`` GPUs."""

    name: str
    """The model's name (``model.name``)."""
    world_size: int
    """GPUs planned for."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size (one StagePlan per stage)."""
    dp: int
    """Data-parallel size: world_size / (tp * pp)."""
    precision: str
    """``trainer.precision``."""
    device: str
    """Which kernels the activation terms follow: ``cuda`` (TE / fused / flash) or ``cpu``."""
    recompute: str
    """``trainer.recompute``: the mode :meth:`total` uses."""
    distributed_optimizer: bool
    """``parallel.use_distributed_optimizer``: the optimizer :meth:`total` uses."""
    sequence_parallel: bool
    """``parallel.sequence_parallel``: the non-TP activations are split over the TP group."""
    groups: int
    """Query groups per micro-batch (``trainer.micro_batch_size``)."""
    documents: int
    """Documents per group (``task.group_size``)."""
    length: int
    """Tokens per sequence planned for (``data.max_length``: the longest a micro-batch pads to)."""
    num_microbatches: int
    """Micro-batches per step on each data-parallel rank."""
    global_batch: int
    """Query groups per step (``trainer.global_batch_size``)."""
    total_params: int
    """Parameters of the whole model (every stage, unsharded; a tied output layer once)."""
    stages: list[StagePlan]
    layer_terms: list[Term]
    """One transformer layer's activation terms on one GPU (per token, this TP shard)."""
    step_flops: float
    """Model FLOPs of one step, forward + backward, all GPUs (megarank.training.flops)."""
    recompute_flops: dict[str, float] = field(default_factory=dict)
    """FLOPs a step spends again recomputing, per recompute mode (not model FLOPs)."""
    windows: int = 1
    """Sequences a document is read as (MaxP at training: ``data.train_passages``, every
    document planned at its most)."""
    token_budget: int | None = None
    """``data.tokens_per_micro_batch``: a micro-batch holds at most this many tokens, planned as
    budget / length sequences of ``length`` tokens (the most any mix of lengths can keep:
    linear terms follow the tokens, attention's quadratic ones are largest at full length)."""

    @property
    def sequences(self) -> float:
        """Sequences per micro-batch: groups x documents x windows, or the token budget's."""
        if self.token_budget:
            return self.token_budget / self.length
        return self.groups * self.documents * self.windows

    @property
    def largest(self) -> StagePlan:
        """The stage that needs the most memory per GPU under the config's choices."""
        return max(self.stages, key=lambda s: s.total(self.recompute, self.distributed_optimizer))

    def total(self, recompute: str | None = None, distributed_optimizer: bool | None = None) -> int:
        """Bytes per GPU of the largest stage (the config's choices unless given)."""
        r = self.recompute if recompute is None else recompute
        d = self.distributed_optimizer if distributed_optimizer is None else distributed_optimizer
        return max(s.total(r, d) for s in self.stages)


@dataclass(frozen=True)
class Fit:
    """Whether a plan's largest stage fits one GPU."""

    gpu: str
    """The card (a name from GPUS, or the size given)."""
    capacity: int
    """Bytes on the card."""
    usable: int
    """capacity less the headroom left free."""
    needed: int
    """Bytes per GPU of the plan's largest stage."""

    @property
    def fits(self) -> bool:
        """needed <= usable."""
        return self.needed <= self.usable

    @property
    def spare(self) -> int:
        """usable - needed (negative: short by that much)."""
        return self.usable - self.needed


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def padded_vocab(m: Any) -> int:
    """Embedding rows: the vocabulary rounded up to make_vocab_size_divisible_by (the same rule
    as megarank.models.build.padded_vocab_size, independent of TP)."""
    div = int(m.make_vocab_size_divisible_by)
    return int(math.ceil(int(m.vocab_size) / div) * div)


def _geometry(m: Any) -> tuple[int, int, int, int, int]:
    h, nq = int(m.hidden_size), int(m.num_attention_heads)
    nkv = int(m.num_query_groups or nq)
    d = int(m.head_dim or h // nq)
    return h, nq, nkv, d, int(m.ffn_hidden_size)


def layer_params(m: Any, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (column/row-parallel weights split,
    norms and row-parallel biases replicated)."""
    h, nq, nkv, d, ffn = _geometry(m)
    qkv = (nq + 2 * nkv) * d
    bias = bool(m.add_bias_linear)
    norm = 2 * h if m.normalization == "LayerNorm" else h  # weight (+ bias)
    fc1 = ffn * (2 if m.gated_linear_unit else 1)
    n = (h * qkv + (qkv if (m.add_qkv_bias or bias) else 0)) // tp
    n += nq * d * h // tp + (h if bias else 0)
    n += (h * fc1 + (fc1 if bias else 0)) // tp
    n += ffn * h // tp + (h if bias else 0)
    n += 2 * norm  # input / pre-MLP norms (decoders) or the two post-LNs (BERT)
    if m.qk_layernorm:
        n += 2 * (2 * d if m.normalization == "LayerNorm" else d)
    return n


def adapter_params(cfg: Any, tp: int) -> int:
    """LoRA parameters of one layer on one TP rank (``peft``): per HF projection, A [r, in] and
    B [out, r], the column-parallel B and row-parallel A split over TP; DoRA adds a magnitude
    per output row, split like B."""
    from megarank.models.lora import PARALLEL, projections

    r, total = int(cfg.peft.rank), 0
    for target in cfg.peft.targets:
        parts, _ = projections(target, cfg.model)
        for p in parts:
            rows = p.out_features // tp if PARALLEL[target] == "column" else p.out_features
            cols = p.in_features if PARALLEL[target] == "column" else p.in_features // tp
            total += r * cols + rows * r + (rows if cfg.peft.method == "dora" else 0)
    return total


def dora_saved_per_token(cfg: Any, tp: int) -> int:
    """Activation bytes per token of one layer that DoRA keeps beyond LoRA's: for each target
    linear, its output without bias (``W x``) and the adapters' (``s B A x``), both read by the
    magnitudes' gradient, ``[out / tp]`` each (column-parallel) or ``[out]`` (row-parallel)."""
    from megarank.models.lora import PARALLEL, projections

    if cfg.peft.method != "dora":
        return 0
    rows = 0
    for target in cfg.peft.targets:
        parts, _ = projections(target, cfg.model)
        out = sum(p.out_features for p in parts)
        rows += out // tp if PARALLEL[target] == "column" else out
    return 2 * rows * WIDTH[cfg.trainer.precision]


def linear_weights(m: Any, tp: int) -> int:
    """Weights (not biases) of one layer's four linears on one TP rank: what QLoRA stores 4-bit."""
    h, nq, nkv, d, ffn = _geometry(m)
    fc1 = ffn * (2 if m.gated_linear_unit else 1)
    return (h * (nq + 2 * nkv) * d + nq * d * h + h * fc1 + ffn * h) // tp


def head_params(cfg: Any) -> int:
    """Trainable head parameters of the last stage (the classifier; a yes/no head is the
    vocabulary)."""
    m, h = cfg.model, int(cfg.model.hidden_size)
    if cfg.task.head == "yes_no":
        return 0
    return h * h + h + h + 1 if m.family == "bert" else h


def stage_params(cfg: Any, tp: int, pp: int, stage: int) -> int:
    """Parameters of pipeline stage ``stage`` on one of its TP ranks, as megarank builds it."""
    m = cfg.model
    h = int(m.hidden_size)
    first, last = stage == 0, stage == pp - 1
    n = int(m.num_layers) // pp * layer_params(m, tp)
    vocab_rows = padded_vocab(m) // tp
    if first:
        n += vocab_rows * h
        if m.family == "bert":
            n += int(m.max_position_embeddings) * h + int(m.type_vocab_size) * h + 2 * h
    if last:
        if m.family != "bert":
            n += 2 * h if m.normalization == "LayerNorm" else h  # final norm
        if cfg.task.head == "yes_no":
            # The LM output layer: its own vocab-parallel copy unless tied on a single stage.
            if not (m.tie_word_embeddings and first):
                n += vocab_rows * h
        elif m.family == "bert":
            n += h * h + h + h + 1  # pooler / dense (h x h + bias), score (h + bias)
        else:
            n += h  # score, no bias
    return n


def total_params(cfg: Any) -> int:
    """Parameters of the whole model on one process (tp1 pp1)."""
    return stage_params(cfg, 1, 1, 0)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """What one layer's activation terms depend on: its widths per token on one GPU, the byte
    widths its kernels keep, and which paths those kernels take (see :func:`layer_terms`)."""

    a: int
    """The activations' bytes per element (trainer.precision)."""
    hs: float
    """The non-tensor-parallel region's width: sharded by sequence under SP."""
    tok: float
    """Per-token statistics there."""
    nq_t: float
    nkv_t: float
    ffn_t: float
    qkv_t: float
    d: int
    length: int
    cpu: bool
    composite: bool
    """torch's CPU RMSNorm is composite: it also keeps the normalised x."""
    math_path: bool
    """SDPA's unfused path on the CPU (attention dropout)."""
    drop: bool
    bert: bool
    rope: bool
    gqa: bool
    stats: int
    """Norm statistics per token: rstd, or mean and rstd."""
    nw: int
    """A norm's kept input: torch's CPU RMSNorm computes in fp32 and keeps an fp32 copy of its
    input and the fp32 normalised x; fused norms (TE, torch's LayerNorm) keep it as it is."""
    sw: int
    """Norm statistics are fp32, but torch's CPU LayerNorm keeps them in the input's dtype."""
    mask_width: int
    """CPU dropout multiplies by a float noise tensor; CUDA's mask is bool."""

    def norm(self, label: str, keep_input: bool = True) -> list[Term]:
        """A norm's terms: its input (unless counted already), normalised x, statistics."""
        t = [Term(f"{label} input", self.hs, self.nw)] if keep_input else []
        if self.composite:
            t.append(Term(f"{label} normalised x", self.hs, FP32))
        t.append(Term(f"{label} statistics", self.stats * self.tok, self.sw))
        return t


def _layer(cfg: Any, tp: int, device: str, length: int) -> _Layer:
    m, p, tr = cfg.model, cfg.parallel, cfg.trainer
    h, nq, nkv, d, ffn = _geometry(m)
    a = WIDTH[tr.precision]
    sp = bool(p.sequence_parallel)
    cpu = device == "cpu"
    rms = m.normalization == "RMSNorm"
    composite = cpu and rms
    return _Layer(
        a=a, hs=h / tp if sp else h, tok=1 / tp if sp else 1, nq_t=nq / tp, nkv_t=nkv / tp,
        ffn_t=ffn / tp, qkv_t=(nq + 2 * nkv) * d / tp, d=d, length=length, cpu=cpu,
        composite=composite, math_path=cpu and float(m.attention_dropout or 0.0) > 0,
        drop=float(m.hidden_dropout or 0.0) > 0, bert=m.family == "bert",
        rope=m.family != "bert", gqa=nkv != nq, stats=1 if rms else 2,
        nw=FP32 if composite else a, sw=a if (cpu and not rms) else FP32,
        mask_width=a if cpu else 1,
    )


def layer_terms(cfg: Any, tp: int, device: str, length: int) -> list[Term]:
    """The activation terms of one transformer layer on one GPU, as megarank builds the layer
    for ``device`` (``cpu``: megatron's local layers + SDPA on the CPU; ``cuda``: TE or fused
    kernels and flash attention). ``length`` enters only the unfused attention terms."""
    x = _layer(cfg, tp, device, length)
    t = _input_terms(x)
    if cfg.model.qk_layernorm:
        t += _qk_norm_terms(x)
    t += _math_attention_terms(x) if x.math_path else _fused_attention_terms(x)
    if x.rope and x.cpu:
        # Unfused RoPE: cos and sin, for q and for k, computed again in every layer.
        t.append(Term("RoPE cos/sin", 4 * x.d, x.a, per_position=True))
    after = _after_core_terms(x, bool(cfg.model.gated_linear_unit))
    return t + [replace(term, after_core=True) for term in after]


def _input_terms(x: _Layer) -> list[Term]:
    """The layer's input and, in a decoder, its first norm (pre-LN)."""
    if x.bert:
        return [Term("layer input (QKV input)", x.hs, x.a, RECOMPUTE)]
    return [Term("norm 1 input (the layer input)", x.hs, x.nw),
            Term("layer input, kept by full recompute", x.hs, x.a, ("full",)),
            *x.norm("norm 1", keep_input=False),
            Term("QKV input (norm 1 output)", x.hs, x.a)]


def _qk_norm_terms(x: _Layer) -> list[Term]:
    """Per-head norms on q and k before RoPE. q's input is a copy; k's a view of the QKV output
    (counted with the attention), unless the composite norm's fp32 upcast copies it."""
    t = [Term("q norm input", x.nq_t * x.d, x.nw)]
    if x.composite and x.a != FP32:
        t.append(Term("k norm input (fp32 copy)", x.nkv_t * x.d, FP32))
    for name, heads in (("q", x.nq_t), ("k", x.nkv_t)):
        if x.composite:
            t.append(Term(f"{name} norm normalised x", heads * x.d, FP32))
        t.append(Term(f"{name} norm statistics", heads, x.sw))
    return t


def _math_attention_terms(x: _Layer) -> list[Term]:
    """SDPA's unfused path: the [s, s] probabilities and dropout mask, which selective
    recompute drops with the rest of the core attention's own tensors."""
    a, d, core = x.a, x.d, ("none",)
    t = [Term("scaled query", x.nq_t * d, a, core)]
    if x.rope and x.gqa:
        t.append(Term("key, repeated to the query heads", x.nq_t * d, a, core))
        t.append(Term("value, repeated to the query heads", x.nq_t * d, a, core))
    else:
        # Decoders' key is RoPE's output (also the recompute's input); an encoder's strided
        # key view is copied.
        if x.rope:
            t.append(Term("key (after RoPE)", x.nkv_t * d, a))
        else:
            t.append(Term("key (contiguous copy)", x.nkv_t * d, a, core))
        t.append(Term("QKV output (held by the value view)", x.qkv_t, a))
    for name in ("attention probabilities", "attention dropout mask",
                 "dropped attention probabilities"):
        t.append(Term(name, x.nq_t * x.length, a, ("none",)))
    if x.rope and x.gqa:  # selective recompute keeps the core attention's inputs instead
        t.append(Term("query (after RoPE), kept for recompute", x.nq_t * d, a, ("selective",)))
        t.append(Term("key (after RoPE), kept for recompute", x.nkv_t * d, a, ("selective",)))
        t.append(Term("QKV output (value view), kept for recompute", x.qkv_t, a,
                      ("selective",)))
    elif x.rope:
        t.append(Term("query (after RoPE), kept for recompute", x.nq_t * d, a, ("selective",)))
    return t


def _fused_attention_terms(x: _Layer) -> list[Term]:
    """Flash (or fused) attention: q, k, v and the softmax's log-sum-exp."""
    t = []
    if x.rope:
        t.append(Term("query (after RoPE)", x.nq_t * x.d, x.a))
        t.append(Term("key (after RoPE)", x.nkv_t * x.d, x.a))
    t.append(Term("QKV output (held by the value view)", x.qkv_t, x.a))
    t.append(Term("softmax log-sum-exp", x.nq_t, FP32, ("none",)))
    if x.bert:
        # SDPA turns the bool padding mask into an additive one in every layer.
        t.append(Term("padding mask", 1, x.a if x.cpu else 1, ("none",)))
    return t


def _after_core_terms(x: _Layer, gated: bool) -> list[Term]:
    """What the layer makes after the core attention: projection, dropout-adds, norms, MLP."""
    a = x.a
    t = [Term("attention output (projection input)", x.nq_t * x.d, a)]
    if x.drop:
        t.append(Term("attention dropout-add mask", x.hs, x.mask_width))
    if x.bert:
        t += x.norm("post-attention norm")
        t.append(Term("fc1 input (norm output)", x.hs, a))
    else:
        t += x.norm("norm 2")
        t.append(Term("fc1 input (norm 2 output)", x.hs, a))
    if gated:
        t.append(Term("fc1 output (gate and up)", 2 * x.ffn_t, a))
        if x.cpu:
            t.append(Term("SiLU output", x.ffn_t, a))
            t.append(Term("up branch copy", x.ffn_t, a))
    else:
        t.append(Term("fc1 output (activation input)", x.ffn_t, a))
    t.append(Term("fc2 input (activation output)", x.ffn_t, a))
    if x.drop:
        t.append(Term("MLP dropout-add mask", x.hs, x.mask_width))
    if x.bert:
        t += x.norm("post-MLP norm")  # its output is the next layer's input
    return t


def paper_layer_terms(h: int, heads: int, tp: int = 1, sequence_parallel: bool = False,
                      length: int = 1) -> list[Term]:
    """The GPT layer of Korthikanti et al. (sec. 4.1) written as terms, in the same units as
    :func:`layer_terms`: 2-byte activations, 1-byte dropout masks, 4h MLP, LayerNorm keeping its
    input, unfused softmax with dropout. Their sum is ``s*b*h*(34 + 5*a*s/h)`` (tp 1)."""
    hs = h / tp if sequence_parallel else h
    return [
        Term("LayerNorm 1 input", hs, 2), Term("QKV input", hs, 2),
        Term("Q and K", 2 * h / tp, 2), Term("softmax output", heads / tp * length, 2, ("none",)),
        Term("softmax dropout mask", heads / tp * length, 1, ("none",)),
        Term("dropped softmax output", heads / tp * length, 2, ("none",)), Term("V", h / tp, 2),
        Term("projection input", h / tp, 2), Term("attention dropout mask", hs, 1),
        Term("LayerNorm 2 input", hs, 2), Term("fc1 input", hs, 2),
        Term("GeLU input", 4 * h / tp, 2), Term("fc2 input", 4 * h / tp, 2),
        Term("MLP dropout mask", hs, 1),
    ]


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1,
                            sequence_parallel: bool = False, selective: bool = False) -> float:
    """Activation bytes of one GPT layer, Korthikanti et al. 2022 eqs. 1-4 (and Table 2):
    ``sbh(34 + 5as/h)``; ``sbh(10 + 24/t + 5as/(ht))`` with TP; ``sbh/t (34 + 5as/h)`` with
    TP + SP; selective recompute removes the ``5as/h`` term."""
    attn = 0.0 if selective else 5 * a * s / h
    if sequence_parallel:
        return s * b * h / t * (34 + attn)
    if t > 1:
        return s * b * h * (10 + 24 / t + attn / t)
    return s * b * h * (34 + attn)


def _sum(terms: list[Term], mode: str, sequences: int, length: int) -> float:
    return sum(x.bytes(sequences, length) for x in terms if mode in x.kept)


def stage_terms(cfg: Any, tp: int, pp: int, stage: int, device: str) -> list[Term]:
    """Activation terms outside the transformer layers on one stage: the embeddings (first
    stage), tensors shared by every layer of the stage, the final norm (last)."""
    m, tr = cfg.model, cfg.trainer
    h = int(m.hidden_size)
    a = WIDTH[tr.precision]
    sp = bool(cfg.parallel.sequence_parallel)
    hs = h / tp if sp else h
    cpu = device == "cpu"
    bert = m.family == "bert"
    mask_width = a if cpu else 1
    t: list[Term] = []
    if stage == 0:
        t.append(Term("input ids", 1, INT64, RECOMPUTE))
        if bert:
            t.append(Term("token type ids", 1, INT64, RECOMPUTE))
            t.append(Term("position ids", 1, INT64, RECOMPUTE, per_position=True))
            # The embedding LayerNorm runs on the whole sequence, before the SP scatter.
            t.append(Term("embedding norm input", h, a, RECOMPUTE))
            t.append(Term("embedding norm statistics", 2, a if cpu else FP32, RECOMPUTE))
        if float(m.hidden_dropout or 0.0) > 0:
            t.append(Term("embedding dropout mask", hs, mask_width, RECOMPUTE))
    if not bert:
        # The RoPE frequencies, one table per forward: kept by fused RoPE, and by full
        # recompute's checkpoints (an input of every layer's).
        h_d = int(m.head_dim or h // int(m.num_attention_heads))
        t.append(Term("RoPE frequencies", h_d, FP32, RECOMPUTE if not cpu else ("full",),
                      per_position=True))
    else:
        # One bool [b, 1, 1, s] mask for the stage, an input of every recompute checkpoint.
        t.append(Term("padding mask (bool), kept for recompute", 1, 1, ("selective", "full")))
    if stage == pp - 1 and not bert:
        composite = cpu and m.normalization == "RMSNorm"
        t.append(Term("final norm input", hs, FP32 if composite else a, RECOMPUTE))
        if composite:
            t.append(Term("final norm normalised x", hs, FP32, RECOMPUTE))
        rms = m.normalization == "RMSNorm"
        t.append(Term("final norm statistics", (1 if rms else 2) / (tp if sp else 1),
                      a if (cpu and not rms) else FP32, RECOMPUTE))
    return t


def head_bytes(cfg: Any, sequences: int, device: str) -> int:
    """Bytes the head and the loss keep per micro-batch on the last stage: pooling indices, the
    pooled states (dropout, the encoder pooler's dense + tanh), the two output-layer rows of
    the yes/no head, the scores and the loss."""
    m = cfg.model
    h, a = int(m.hidden_size), WIDTH[cfg.trainer.precision]
    mask_width = a if device == "cpu" else 1
    p = float((m.hidden_dropout if m.classifier_dropout is None else m.classifier_dropout) or 0.0)
    # A dropout keeps its mask, and its output becomes the next layer's saved input.
    dropped = h * (mask_width + a)
    if cfg.task.head == "yes_no":
        states, fixed = h * a, 2 * h * a
    elif m.family != "bert":
        states, fixed = (dropped if p > 0 else h * a), 0
    elif m.encoder_head == "roberta":  # dropout, dense, tanh, dropout, out_proj
        states, fixed = (2 * dropped + h * a if p > 0 else 2 * h * a), 0
    else:  # BERT: dense (pooler), tanh, dropout, classifier
        states, fixed = 2 * h * a + (dropped if p > 0 else 0), 0
    per_seq = 2 * INT64 + states + FP32  # pooling rows and columns, states, the score
    groups = sequences // int(cfg.task.group_size)
    return per_seq * sequences + fixed + groups * INT64 + FP32


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def resolve_device(cfg: Any, device: str | None) -> str:
    """The device the plan is for: ``device``, else trainer.device (``auto`` plans for CUDA)."""
    dev = device or cfg.trainer.device
    dev = "cuda" if dev == "auto" else dev
    if dev not in DEVICES:
        raise ValueError(f"device ({dev!r}) must be one of {', '.join(DEVICES)}")
    return dev


def hf_resolved(cfg: Any) -> Any:
    """``cfg`` with the model group filled from model.hf_path's config.json (a copy; unchanged
    when no HF path is set). A missing directory is named, with what the plan needs from it."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from megarank.checkpoint.hf import apply_hf_config

    if OmegaConf.is_missing(cfg.model, "hf_path") or not cfg.model.hf_path:
        unset = sorted(OmegaConf.missing_keys(cfg.model))
        if unset or OmegaConf.is_missing(cfg.model, "hf_path"):
            raise ValueError(
                "model.hf_path is not set: give model.hf_path=DIR, the Hugging Face directory "
                "whose config.json sizes the model" + (f" ({', '.join(unset)} unset)"
                                                       if unset else ""))
        return cfg

    path = Path(str(cfg.model.hf_path))
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(
            f"model.hf_path={path} {what}: the plan reads the model's geometry (layers, "
            "hidden size, heads, vocabulary) from its config.json")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    apply_hf_config(cfg)
    return cfg


def plan_memory(cfg: Any, world_size: int, device: str | None = None) -> MemoryPlan:
    """Memory per GPU and FLOPs per step of ``cfg`` (a composed config) on ``world_size`` GPUs.

    Validates the config for that world first (a layout that does not divide is refused, the
    fields named). ``device``: whose kernels the activation terms follow (default: the config's
    trainer.device, ``auto`` meaning CUDA). Reads no weights; ``model=hf`` reads config.json.
    """
    cfg = hf_resolved(cfg)
    d = validate(cfg, world_size)
    dev = resolve_device(cfg, device)
    m, tr = cfg.model, cfg.trainer
    length = int(cfg.data.max_length)
    windows = int(cfg.data.train_passages) if cfg.data.passages == "max" else 1
    budget = cfg.data.tokens_per_micro_batch
    sequences = budget / length if budget else d.pairs_per_micro_batch * windows
    terms = layer_terms(cfg, d.tp, dev, length)
    per_layer = {mode: _sum(terms, mode, sequences, length) for mode in RECOMPUTE}
    core = per_layer["none"] - per_layer["selective"]
    after = _sum([x for x in terms if x.after_core], "none", sequences, length)
    # Full recompute re-runs one layer in the backward, which materialises again what
    # "none" keeps for it. Selective recompute re-runs the core attention once the layer's
    # projection and MLP backward have freed their tensors: it adds what the core keeps
    # beyond those (nothing with flash attention). Both are upper bounds: the final norm's
    # and the head's tensors are freed by then too.
    working = {"none": 0, "selective": int(max(0.0, core - after)),
               "full": int(per_layer["none"] - per_layer["full"])}
    stages = [_stage_plan(cfg, d, r, dev, per_layer, working, sequences) for r in range(d.pp)]
    seqs_per_step = int(tr.global_batch_size) * int(cfg.task.group_size) * windows
    flops = step_flops(m, length, seqs_per_step, head=cfg.task.head)
    fwd = forward_flops_breakdown(m, length, head=cfg.task.head)
    recompute_flops = {"none": 0.0, "selective": fwd["attention"] * seqs_per_step,
                       "full": sum(fwd.values()) * seqs_per_step}
    return MemoryPlan(
        name=str(m.name), world_size=world_size, tp=d.tp, pp=d.pp, dp=d.dp,
        precision=str(tr.precision), device=dev, recompute=str(tr.recompute),
        distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        sequence_parallel=bool(cfg.parallel.sequence_parallel),
        groups=int(tr.micro_batch_size), documents=int(cfg.task.group_size), length=length,
        num_microbatches=d.num_microbatches, global_batch=int(tr.global_batch_size),
        total_params=total_params(cfg), stages=stages, layer_terms=terms, step_flops=flops,
        recompute_flops=recompute_flops, windows=windows,
        token_budget=int(budget) if budget else None,
    )


def _stage_plan(cfg: Any, d: Any, r: int, dev: str, per_layer: dict[str, float],
                working: dict[str, int], sequences: float) -> StagePlan:
    """Pipeline stage ``r`` of the layout ``d``: its model state and its activations (one
    layer's ``per_layer`` bytes per recompute mode, for ``sequences`` per micro-batch)."""
    m, tr = cfg.model, cfg.trainer
    width = WIDTH[tr.precision]
    length = int(cfg.data.max_length)
    layers = int(m.num_layers) // d.pp
    h = int(m.hidden_size)
    hs = h / d.tp if cfg.parallel.sequence_parallel else h
    extra = stage_terms(cfg, d.tp, d.pp, r, dev)
    dora = dora_saved_per_token(cfg, d.tp) * sequences * length
    saved = {}
    for mode in RECOMPUTE:
        n = layers * per_layer[mode] + _sum(extra, mode, sequences, length)
        if mode != "full":  # full recompute keeps the layer's input only
            n += layers * dora
        if r == d.pp - 1:
            n += head_bytes(cfg, sequences, dev)
        saved[mode] = int(n)
    in_flight = min(d.num_microbatches, d.pp - r)
    outputs = 0 if r == d.pp - 1 else int(in_flight * sequences * length * hs * width)
    params = stage_params(cfg, d.tp, d.pp, r)
    weights, trained = params * width, params
    if cfg.peft.method != "none":
        # LoRA/DoRA: the base is frozen; adapters (and the classifier head) train.
        adapters = layers * adapter_params(cfg, d.tp)
        trained = adapters + (head_params(cfg) if r == d.pp - 1 and cfg.peft.train_head
                              else 0)
        params += adapters
        weights = params * width
        if cfg.peft.method == "qlora":  # NF4: two weights a byte, in place of `width`
            base = layers * linear_weights(m, d.tp)
            weights -= base * width - base // 2
    optim = trained * (8 if tr.precision == "fp32" else 12)
    return StagePlan(
        stage=r, layers=layers, params=params, weights=weights, grads=trained * FP32,
        optim_plain=optim, optim_distributed=int(math.ceil(optim / d.dp)),
        saved_per_micro_batch=saved, working_set=dict(working), in_flight=in_flight,
        pipeline_outputs=outputs,
    )


def largest_token_budget(cfg: Any, world_size: int, gpu: str, headroom: float = HEADROOM,
                         device: str | None = None) -> int | None:
    """The largest ``data.tokens_per_micro_batch`` whose plan fits ``gpu`` (in steps of
    data.packed_multiple with packing, else of data.max_length), or None when not even one
    group at its longest fits. The config's other choices (recompute, optimizer) stay."""
    from omegaconf import OmegaConf

    d = cfg.data
    step = int(d.packed_multiple if d.packing else d.max_length)
    windows = int(d.train_passages) if d.passages == "max" else 1
    least = -(-int(cfg.task.group_size) * windows * int(d.max_length) // step)

    def fits(k: int) -> bool:
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        c.data.tokens_per_micro_batch = k * step
        return fit(plan_memory(c, world_size, device), gpu, headroom).fits

    if not fits(least):
        return None
    lo, hi = least, least * 2
    while fits(hi):  # double until it no longer fits, then halve the gap
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# --------------------------------------------------------------------------------------------
# GPUs and the table
# --------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.upper())


def gpu_memory(gpu: str) -> tuple[str, int]:
    """(name, bytes) of a known card (``H100-80GB``, ``h100``, ``A100-40GB``, ...) or of a size
    (``80GB`` / ``80GiB`` / ``80``: GiB). An unknown name is refused with the known ones listed."""
    size = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GIB|G)?\s*", gpu.upper())
    if size:
        return f"{float(size.group(1)):g} GiB", int(float(size.group(1)) * GIB)
    key = _key(gpu)
    exact = [n for n in GPUS if _key(n) == key]
    # A bare model name (H100) matches the card of that name when it comes in one size.
    prefix = [n for n in GPUS if _key(n).startswith(key) and _key(n)[len(key):len(key) + 1]
              .isdigit()]
    hits = exact or (prefix if len(prefix) == 1 else [])
    if not hits:
        raise ValueError(f"unknown GPU {gpu!r}: give a memory size (e.g. 80GB) or one of "
                         f"{', '.join(GPUS)}")
    return hits[0], int(GPUS[hits[0]] * GIB)


def fit(plan: MemoryPlan, gpu: str, headroom: float = HEADROOM, recompute: str | None = None,
        distributed_optimizer: bool | None = None) -> Fit:
    """Whether the plan's largest stage fits ``gpu`` with ``headroom`` of it left free."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom ({headroom}) must be in [0, 1)")
    name, capacity = gpu_memory(gpu)
    return Fit(name, capacity, int(capacity * (1 - headroom)),
               plan.total(recompute, distributed_optimizer))


def suggestions(plan: MemoryPlan, gpu: str, headroom: float = HEADROOM) -> list[str]:
    """Changes to the config's memory settings that make the plan fit ``gpu``, each with the
    bytes per GPU it would need (empty when it fits, or when no such change fits)."""
    out = []
    options = [(r, z) for z in (plan.distributed_optimizer, True) for r in RECOMPUTE]
    for r, z in dict.fromkeys(options):
        if (r, z) == (plan.recompute, plan.distributed_optimizer):
            continue
        f = fit(plan, gpu, headroom, r, z)
        if f.fits:
            change = [f"trainer.recompute={r}"] if r != plan.recompute else []
            if z != plan.distributed_optimizer:
                change.append("parallel.use_distributed_optimizer=true")
            out.append(f"{' '.join(change)} ({f.needed / GIB:.1f} GiB)")
    return out


def _unit(plan: MemoryPlan) -> tuple[str, int]:
    """GiB, or MiB for a plan whose largest stage stays under 1 GiB."""
    return ("GiB", GIB) if plan.total() >= GIB else ("MiB", 1024**2)


def format_plan(plan: MemoryPlan, gpu: str | None = None, headroom: float = HEADROOM) -> str:
    """The plan as a text table: one column per pipeline stage, GiB per GPU; with ``gpu``, a
    last line saying whether (and by how much) the largest stage fits that card."""
    lines = [*_plan_header(plan), "", *_stage_table(plan)]
    per_gpu = plan.step_flops / plan.world_size
    extra = plan.recompute_flops.get(plan.recompute, 0.0)
    lines += ["", f"FLOPs per step: {plan.step_flops:.3e} model (forward + backward), "
              f"{per_gpu:.3e} per GPU; recompute {plan.recompute} adds {extra:.3e}"]
    if gpu is not None:
        lines += _fit_lines(plan, gpu, headroom)
    return "\n".join(lines)


def _plan_header(plan: MemoryPlan) -> list[str]:
    """The model, the layout and the micro-batch."""
    kernels = ("CUDA kernels (TE / fused norms and SwiGLU, flash attention)"
               if plan.device == "cuda" else "CPU kernels (megatron local layers, SDPA)")
    zero = f"distributed optimizer over DP {plan.dp}" if plan.distributed_optimizer \
        else "plain optimizer"
    return [
        f"megarank plan: {plan.name}, {plan.total_params / 1e9:.3f}B parameters",
        f"layout: {plan.world_size} GPUs = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
        f"{', sequence parallel' if plan.sequence_parallel else ''}; {plan.precision}; {zero}; "
        f"recompute {plan.recompute}; {kernels}",
        (f"micro-batch: at most {plan.token_budget:,} tokens (data.tokens_per_micro_batch), "
         f"planned as {plan.sequences:.1f} sequences of {plan.length} tokens; whole groups of "
         f"{plan.documents} documents, at most {plan.num_microbatches} micro-batches per step on "
         f"each DP rank (global batch {plan.global_batch} groups)" if plan.token_budget else
         f"micro-batch: {plan.groups} group(s) x {plan.documents} documents"
         f"{f' x {plan.windows} windows (MaxP)' if plan.windows > 1 else ''} x {plan.length} "
         f"tokens = {plan.sequences * plan.length:,} tokens; {plan.num_microbatches} "
         f"micro-batches per step on each DP rank (global batch {plan.global_batch} groups)"),
    ]


def _stage_table(plan: MemoryPlan) -> list[str]:
    """One column per pipeline stage: model state, activations and the total per GPU."""
    unit, div = _unit(plan)

    def _gib(n: float) -> str:
        return f"{n / div:.2f}"

    cols = [f"stage {s.stage} ({s.layers} layers)" for s in plan.stages]
    rows: list[tuple[str, list[str]]] = [
        ("parameters per GPU", [f"{s.params / 1e6:,.1f}M" for s in plan.stages]),
        (f"weights ({plan.precision})", [_gib(s.weights) for s in plan.stages]),
        ("gradients (fp32)", [_gib(s.grads) for s in plan.stages]),
        ("optimizer, plain", [_gib(s.optim_plain) for s in plan.stages]),
        (f"optimizer, distributed (/{plan.dp})", [_gib(s.optim_distributed) for s in plan.stages]),
    ]
    for mode in RECOMPUTE:
        rows.append((f"activations / micro-batch, {mode}",
                     [_gib(s.saved_per_micro_batch[mode]) for s in plan.stages]))
    rows += [
        ("micro-batches in flight", [str(s.in_flight) for s in plan.stages]),
        ("pipeline outputs kept", [_gib(s.pipeline_outputs) for s in plan.stages]),
        (f"recompute working set ({plan.recompute})",
         [_gib(s.working_set[plan.recompute]) for s in plan.stages]),
        (f"activations ({plan.recompute})", [_gib(s.activations(plan.recompute))
                                             for s in plan.stages]),
        ("total per GPU", [_gib(s.total(plan.recompute, plan.distributed_optimizer))
                           for s in plan.stages]),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    widths = [max(len(c), *(len(r[1][i]) for r in rows)) + 2 for i, c in enumerate(cols)]
    lines = [f"{unit} per GPU".ljust(w0) + "".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    for label, vals in rows:
        lines.append(label.ljust(w0) + "".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)))
    return lines


def _fit_lines(plan: MemoryPlan, gpu: str, headroom: float) -> list[str]:
    """Whether the largest stage fits ``gpu``, and what would make it fit."""
    f = fit(plan, gpu, headroom)
    verdict = (f"fits, {f.spare / GIB:.1f} GiB to spare" if f.fits
               else f"DOES NOT FIT, short by {-f.spare / GIB:.1f} GiB")
    lines = [f"GPU {f.gpu}: {f.capacity / GIB:.0f} GiB, {headroom:.0%} left free -> "
             f"{f.usable / GIB:.1f} GiB usable; largest stage needs "
             f"{f.needed / GIB:.1f} GiB: {verdict}"]
    if not f.fits:
        tips = suggestions(plan, gpu, headroom)
        lines.append("  would fit with: " + "; ".join(tips) if tips else
                     "  no recompute or optimizer setting makes it fit: use more GPUs "
                     "(TP/PP), a shorter data.max_length or a smaller micro-batch")
    return lines
