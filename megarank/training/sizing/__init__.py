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
  as under the paper's selective recompute. With attention dropout on the CPU, megarank's own
  dropout attention (megarank.models.attention.attend) computes in fp32, as SDPA's math
  kernel does, and keeps the softmax output, a bool dropout mask and the dropped probabilities
  (``nq*s`` each per token; fp32, fp32 and 1 byte).
- Grouped-query attention and RoPE: queries ``nq*d`` and keys ``nkv*d`` (RoPE's outputs); the
  value is a view of the fused QKV output, which it keeps alive whole (``(nq + 2*nkv)*d``, where
  the paper counts V alone, h).
- SwiGLU: the fc1 output (2F: gate and up) and the fc2 input (F); megatron's unfused path (CPU)
  also keeps the SiLU output and a copy of the up branch (2F more). GeLU (BERT): the
  activation's input and output (2F, the paper's 8h at F = 4h).
- Norms keep their input and per-token statistics (fp32, which the paper leaves out). On the CPU
  torch's RMSNorm is composite and computes in fp32: it keeps an fp32 copy of its input and the
  fp32 normalised x; its LayerNorm keeps the statistics in the input's dtype.
- Dropout (hidden_dropout > 0): a mask per dropout, bool (1 byte) on CUDA and in the layers'
  residual adds on the CPU (megarank.models.dropout); torch's CPU dropout elsewhere (the
  embeddings, the head) keeps a float noise tensor of the activation dtype.
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

The package splits the plan by what it plans: ``params`` (parameters per GPU), ``activations``
(the terms above), ``stages`` (:func:`plan_memory`, a stage at a time), ``fit`` (cards and
headroom), ``table`` (:func:`format_plan`); ``records`` holds the dataclasses they share.
"""

from megarank.training.sizing.activations import (
    head_bytes,
    korthikanti_layer_bytes,
    layer_terms,
    paper_layer_terms,
    stage_terms,
)
from megarank.training.sizing.fit import GPUS, Fit, fit, gpu_memory, suggestions
from megarank.training.sizing.params import (
    adapter_params,
    dora_saved_per_token,
    head_params,
    layer_params,
    linear_weights,
    stage_params,
    total_params,
)
from megarank.training.sizing.records import (
    DEVICES,
    FP32,
    GIB,
    HEADROOM,
    INT64,
    RECOMPUTE,
    WIDTH,
    MemoryPlan,
    StagePlan,
    Term,
)
from megarank.training.sizing.stages import (
    hf_resolved,
    largest_token_budget,
    plan_memory,
    resolve_device,
)
from megarank.training.sizing.table import format_plan

__all__ = [
    "DEVICES", "FP32", "GIB", "GPUS", "HEADROOM", "INT64", "RECOMPUTE", "WIDTH", "Fit",
    "MemoryPlan", "StagePlan", "Term", "adapter_params", "dora_saved_per_token", "fit",
    "format_plan", "gpu_memory",
    "head_bytes", "head_params", "hf_resolved", "korthikanti_layer_bytes", "largest_token_budget",
    "layer_params", "layer_terms", "linear_weights", "paper_layer_terms",
    "plan_memory", "resolve_device", "stage_params", "stage_terms", "suggestions", "total_params",
]
