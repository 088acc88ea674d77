"""Training throughput of megarank's step against its peers on one GPU: a plain Hugging Face loop
and a padding-free ("packed") reference built on the same Hugging Face model.

    python benchmarks/peers.py                       # Qwen2.5-0.5B and BERT-base geometries
    python benchmarks/peers.py --geometry decoder --lengths realistic
    python benchmarks/peers.py --smoke               # tiny models on the CPU: checks the script
    python benchmarks/peers.py --tiny --cpu --lengths realistic --seq 256 --steps 100
                                                     # the CPU proxies over 100 steps

Systems (each one runs in its own fresh Python process: this script calls itself with
``--system NAME --json OUT`` and collects the rows; ``--smoke`` runs the Hugging Face systems in
one process and megarank's in another):

- ``hf-bf16``: ``AutoModelForSequenceClassification`` (random weights, ``num_labels=1``) with
  bf16 weights, SDPA attention and ``torch.optim.AdamW(fused=True)``; each micro-batch
  right-padded to its longest pair; listwise loss (cross-entropy over each group of
  ``--group-size`` scores, the positive first); gradients accumulated over the micro-batches;
  gradient norm clipped at 1.0 (as the HF Trainer does by default; megarank clips at 1.0 too).
- ``hf-autocast``: the same with fp32 weights under ``torch.autocast(bfloat16)``.
- ``packed-ref``: the same HF model (bf16 weights), each micro-batch's pairs laid end to end in
  ONE row, ``position_ids`` restarting at 0 for each pair, attention kept inside each pair by an
  attention function registered with transformers' ``AttentionInterface``: on CUDA
  ``torch.nn.attention.varlen.varlen_attn``; on the CPU (or without varlen_attn) exact per-pair
  attention (the packed tokens scattered into a [pairs, longest] layout, batched SDPA with a
  key-padding and, for decoders, causal mask, gathered back). A decoder pair is scored at its
  last token through the model's ``score`` layer, an encoder pair at its first ([CLS]) through
  BERT's pooler and classifier.
- ``packed-ref-1mb``: the packed reference with the whole step's pairs in one micro-batch.
- ``megarank``: megarank's own training step (classifier head, bf16 on CUDA), right-padded.
- ``megarank-packed`` / ``megarank-packed-1mb``: megarank with ``data.packing=true`` and its
  ``megarank.data.packing.pack_batch`` (the step's micro-batches / all its pairs in one
  micro-batch); "not available" where megarank has no packing.

Every system trains on the same synthetic batches (fixed seed): ``--groups`` x ``--group-size``
documents x ``--micro-batches`` = 64 pairs a step by default; lengths uniform in 0.6-1.0 x
``--seq`` or ``--lengths realistic`` (query 8-16 tokens + a log-normal passage of about
60-120 tokens, cut at --seq). Random weights, dropout 0 everywhere (varlen attention has no
dropout). Padding and packing are done before timing, as a data loader does them off the step;
moving the batch to the GPU is part of the step.

Per system: pairs/s and real tokens/s (median step of ``--steps`` timed steps, after
``--warmup`` warm-up steps that cycle through the same batches, so the timed widths have been
seen); the mean step time of the first min(20, --warmup) steps from a cold start; MFU at real
tokens (megarank.training.flops.step_flops summed over each pair's REAL length, over the dense
bf16 peak of megarank.training.flops.peak_tflops); peak memory (max_memory_allocated); the
GPU-busy fraction (torch.profiler over 3 more steps: the union of the device's kernel and copy
time over the wall time); host synchronisations in one more step (CUDA:
``torch.cuda.set_sync_debug_mode(1)``'s warnings; CPU: :class:`SyncCounter`); framework
operators a step dispatches over its micro-batches (:class:`OpCounter`); distinct input
shapes over the timed steps; padded tokens; and pairs/s against ``hf-bf16``. One markdown table
per geometry, then the speed targets that table answers (:func:`targets`: on a GPU megarank's
best row against the HF loop and the padding-free reference, MFU, GPU busy, the cold start; on
the CPU the proxies), each with what was measured, what is needed and whether it is met.

On the GPU machine (PyTorch and transformers preinstalled) carry megatron-core, hydra-core,
omegaconf and antlr4-python3-runtime==4.9.3 as wheels (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent

SYSTEMS = ("hf-bf16", "hf-autocast", "packed-ref", "packed-ref-1mb", "megarank",
           "megarank-packed", "megarank-packed-1mb")
BASELINE = "hf-bf16"
GEOMETRIES = {  # megarank model preset: (full size, --smoke)
    "decoder": ("qwen2_0p5b", "gpt_tiny"),
    "encoder": ("bert_base", "bert_tiny"),
}
ATTN_NAME = "megarank_varlen"
"""The name the packed reference's attention function is registered under in transformers."""


# --------------------------------------------------------------------------------------------
# Host synchronisations
# --------------------------------------------------------------------------------------------

class SyncCounter(TorchFunctionMode):
    """Count the tensor calls that make the host wait for the device (a CPU-run stand-in for
    CUDA's sync debug mode): ``Tensor.item``, ``tolist``, ``__bool__``, ``__int__``,
    ``__float__``, ``nonzero`` / ``torch.nonzero``, ``Tensor.cpu`` and ``.to('cpu')``.

    A move of a tensor that is already on the CPU is a no-op and is not counted (a CPU run's
    ``batch.to(device)`` would otherwise count what on a GPU is a host-to-device copy).

        with SyncCounter() as sc:
            step()
        sc.total, sc.counts   # 3, Counter({'item': 2, '__bool__': 1})
    """

    NAMES = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "nonzero"})

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.counts[name] += 1
        elif name in ("cpu", "to") and args and _leaves_device(name, args, kwargs):
            self.counts["cpu" if name == "cpu" else "to(cpu)"] += 1
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Count the framework operators (ATen calls, after autograd: forward, backward and the
    optimizer's) a step dispatches: each is a kernel launch or more on a GPU, and the Python
    and dispatcher time around it is what small kernels cannot hide."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _leaves_device(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.cpu`` / ``Tensor.to`` with these arguments copies a device tensor to the
    host."""
    src = args[0]
    if not isinstance(src, torch.Tensor) or src.device.type == "cpu":
        return False
    if name == "cpu":
        return True
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, str | torch.device):
            target = a
    return target is not None and torch.device(target).type == "cpu"


# --------------------------------------------------------------------------------------------
# Synthetic batches
# --------------------------------------------------------------------------------------------

def synthetic_steps(args, kind: str, vocab: int) -> list[list]:
    """``args.steps`` steps, each ``args.micro_batches`` PairBatches of ``args.groups`` x
    ``args.group_size`` pairs, right-padded to a multiple of ``args.pad_multiple``; token ids in
    [100, vocab), pad id 0; encoders: token type 1 on the document; pooled position 0 (encoder)
    or the last real token (decoder)."""

    from megarank.data.batch import PairBatch

    g = torch.Generator().manual_seed(args.seed)
    rows, seq = args.groups * args.group_size, args.seq
    steps = []
    for _ in range(args.steps):
        micro = []
        for _ in range(args.micro_batches):
            query = torch.randint(8, 17, (rows,), generator=g)
            if args.lengths == "uniform":
                lengths = torch.randint(int(0.6 * seq), seq + 1, (rows,), generator=g)
            else:  # query + a passage of median 85 tokens, two thirds in 60-120; 3 specials
                passage = torch.empty(rows).log_normal_(math.log(85.0), 0.35, generator=g)
                lengths = (3 + query + passage.round().long()).clamp(max=seq)
            width = -(-int(lengths.max()) // args.pad_multiple) * args.pad_multiple
            pos = torch.arange(width)[None]
            mask = (pos < lengths[:, None]).long()
            ids = torch.randint(100, vocab, (rows, width), generator=g) * mask
            types = ((pos >= query[:, None] + 2) & mask.bool()).long() if kind == "encoder" \
                else torch.zeros_like(mask)
            pool = torch.zeros(rows, dtype=torch.long) if kind == "encoder" else lengths - 1
            micro.append(PairBatch(ids, mask, types, pool, args.group_size, int(lengths.sum())))
        steps.append(micro)
    return steps


def merge_batches(batches: list):
    """One PairBatch holding every pair of ``batches`` (padded to the widest)."""
    import torch.nn.functional as F

    width = max(b.input_ids.shape[1] for b in batches)

    def cat(name: str):
        return torch.cat([F.pad(getattr(b, name), (0, width - b.input_ids.shape[1]))
                          for b in batches])

    return replace(batches[0], input_ids=cat("input_ids"), attention_mask=cat("attention_mask"),
                   token_type_ids=cat("token_type_ids"),
                   pool_index=torch.cat([b.pool_index for b in batches]),
                   num_real_tokens=sum(b.num_real_tokens for b in batches))


def _pin(batch):
    """``batch`` (a PairBatch or a _Packed) with its tensors in page-locked memory, those of a
    nested batch too (a packed PairBatch's ``packed``: its boundaries and positions), so every
    copy of the step to the GPU is asynchronous."""
    from megarank.data.batch import each_tensor

    return each_tensor(batch, torch.Tensor.pin_memory)


# --------------------------------------------------------------------------------------------
# The packed reference: one row a micro-batch, attention kept inside each pair
# --------------------------------------------------------------------------------------------

@dataclass
class _Packed:
    """A micro-batch's pairs end to end in one row, with what the attention function needs."""

    input_ids: object  # [1, T]
    token_type_ids: object  # [1, T]
    position_ids: object  # [1, T], 0 at each pair's first token
    cu_seqlens: object  # [P + 1] int32
    pool: object  # [P] the scored token of each pair (its first or last)
    gather: object  # [P * L] the token in each slot of the [P, L] layout (0 in padding slots)
    slot_valid: object  # [P, L] bool
    back: object  # [T] each token's slot
    max_len: int
    num_pairs: int

    def to(self, device, non_blocking: bool = False) -> _Packed:
        return replace(self, **{k: v.to(device, non_blocking=non_blocking)
                                for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


def pack_reference(batch) -> _Packed:
    """The packed form of a right-padded PairBatch (host side)."""

    valid = batch.attention_mask.bool()
    lengths = batch.attention_mask.sum(1)
    n, width = valid.shape
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    max_len = int(lengths.max())
    slot_valid = torch.arange(max_len)[None] < lengths[:, None]  # [P, L]
    gather = (cu[:-1, None].long() + torch.arange(max_len)[None]) * slot_valid
    return _Packed(
        input_ids=batch.input_ids[valid][None],
        token_type_ids=batch.token_type_ids[valid][None],
        position_ids=torch.arange(width).expand(n, width)[valid][None],
        cu_seqlens=cu, pool=cu[:-1].long() + batch.pool_index, gather=gather.flatten(),
        slot_valid=slot_valid, back=slot_valid.flatten().nonzero().squeeze(1),
        max_len=max_len, num_pairs=n)


_LAYOUT: list = [None]
"""The _Packed (on the model's device) of the micro-batch being run."""


def _varlen_fn():
    """torch's varlen_attn, or None where this PyTorch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_for(q):
    """varlen_attn where it runs on ``q`` (CUDA, bf16/fp16), else None."""
    fn = _varlen_fn()
    return fn if fn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) \
        else None


@functools.cache
def _params(fn) -> frozenset[str]:
    """The parameter names of ``fn`` (varlen_attn's differ between PyTorch releases)."""
    return frozenset(inspect.signature(fn).parameters)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function over the packed row in ``_LAYOUT[0]``: query [1, Hq, T,
    D], key/value [1, Hkv, T, D]; returns ([1, T, Hq, D], None). Each token attends only to its
    own pair (causally for decoders)."""
    import torch.nn.functional as F

    lay = _LAYOUT[0]
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D] views
    hq, hkv = q.shape[1], k.shape[1]
    fn = _varlen_for(q)
    if fn is not None:
        params = _params(fn)
        kw = {}
        if "scale" in params:
            kw["scale"] = scaling
        if causal:
            if "window_size" in params:
                kw["window_size"] = (-1, 0)
            else:
                kw["is_causal"] = True
        if hq != hkv:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
        q, k, v = (t.contiguous() for t in (q, k, v))
        out = fn(q, k, v, lay.cu_seqlens, lay.cu_seqlens, lay.max_len, lay.max_len, **kw)
        return out.unsqueeze(0), None
    # Exact per-pair attention: scatter into [P, L], batched SDPA, gather back.
    p, length = lay.num_pairs, lay.max_len
    if hq != hkv:
        k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))

    def padded(t):
        return t[lay.gather].view(p, length, hq, t.shape[-1]).transpose(1, 2)

    mask = lay.slot_valid[:, None, None, :]  # keys: the pair's own tokens
    if causal:
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask,
                                         scale=scaling)  # [P, H, L, D]
    out = out.transpose(1, 2).reshape(p * length, hq, -1)[lay.back]  # [T, H, D]
    return out.unsqueeze(0), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, packed_attention)


def packed_scores(model, batch: _Packed, kind: str):
    """[P] scores of the packed row's pairs."""
    _LAYOUT[0] = batch
    if kind == "decoder":
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             use_cache=False).last_hidden_state[0]  # [T, h]
        return model.score(hidden[batch.pool]).squeeze(-1)
    bert = model.bert
    hidden = bert(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                  position_ids=batch.position_ids).last_hidden_state[0]  # [T, h]
    pooled = bert.pooler(hidden[batch.pool][:, None])  # the pooler reads position 0: the [CLS]
    return model.classifier(model.dropout(pooled)).squeeze(-1)


def padded_scores(model, batch, kind: str):
    """[N] scores of a right-padded micro-batch through the model's own forward."""
    extra = {"token_type_ids": batch.token_type_ids} if kind == "encoder" else {"use_cache": False}
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 **extra).logits.squeeze(-1)


# --------------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------------

class NotAvailable(Exception):
    """The system cannot run here (e.g. megarank without packing)."""


@dataclass
class Prepared:
    """A system ready to time: ``step(feed)`` runs one optimizer step on a prepared feed."""

    step: object
    feeds: list  # per step: what ``step`` takes
    shapes: list  # per step: the input_ids shapes the model is fed
    info: dict
    close: object = None


def hf_config(model_cfg, kind: str):
    """The transformers config of megarank's model preset (random weights, one label, pad id 0,
    dropout 0)."""
    m = model_cfg
    common = dict(vocab_size=int(m.vocab_size), hidden_size=int(m.hidden_size),
                  num_hidden_layers=int(m.num_layers), num_attention_heads=int(m.num_attention_heads),
                  intermediate_size=int(m.ffn_hidden_size),
                  max_position_embeddings=int(m.max_position_embeddings), num_labels=1,
                  pad_token_id=0)
    if kind == "encoder":
        from transformers import BertConfig

        return BertConfig(**common, type_vocab_size=int(m.type_vocab_size),
                          layer_norm_eps=float(m.layernorm_epsilon), hidden_act="gelu",
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          classifier_dropout=0.0)
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if m.add_qkv_bias else LlamaConfig
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    rope_kw = ({"rope_parameters": rope} if "rope_parameters" in inspect.signature(cls).parameters
               else {"rope_theta": rope["rope_theta"]})
    extra = {"tie_word_embeddings": True} if cls is Qwen2Config else {
        "attention_bias": False, "mlp_bias": False}
    return cls(**common, num_key_value_heads=int(m.num_query_groups or m.num_attention_heads),
               rms_norm_eps=float(m.layernorm_epsilon), attention_dropout=0.0, use_cache=False,
               **rope_kw, **extra)


def build_hf(args, system: str, kind: str, model_cfg, device):
    """The HF model of ``system``: bf16 weights on CUDA (fp32 for hf-autocast and on the CPU),
    built on ``device`` as ``from_pretrained(dtype=...)`` would hold it."""
    from transformers import AutoModelForSequenceClassification

    packed = system.startswith("packed-ref")
    if packed:
        register_packed_attention()
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if device.type == "cuda" and system != "hf-autocast" else torch.float32
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(
            hf_config(model_cfg, kind), attn_implementation=ATTN_NAME if packed else "sdpa",
            dtype=dtype)
    return model.to(device).train()


def parity(model, batch, kind: str) -> float:
    """max |packed-reference score - padded HF score| of ``batch``'s pairs, same weights."""

    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = padded_scores(model, batch, kind).float()
        model.set_attn_implementation(ATTN_NAME)
        got = packed_scores(model, pack_reference(batch).to(ref.device), kind).float()
    return float((got - ref).abs().max())


def prepare_hf(args, system: str, kind: str, model_cfg, steps: list, device) -> Prepared:
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    model = build_hf(args, system, kind, model_cfg, device)
    info: dict = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    packed = system.startswith("packed-ref")
    if packed:
        first = steps[0][0].to(device)
        info["parity"] = parity(model, first, kind)
        info["parity_dtype"] = info["dtype"]
        fn = _varlen_fn()
        info["attention"] = ("torch varlen_attn" if cuda and fn is not None else
                             "per-pair SDPA (scatter to [pairs, longest], gather back)")
    else:
        info["attention"] = "sdpa, padded"
    autocast = cuda and system == "hf-autocast"
    if autocast:
        info["dtype"] += " + autocast bf16"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, **({"fused": True} if cuda
                                                                      else {}))
    one_mb = system.endswith("-1mb")
    feeds, shapes = [], []
    for micro in steps:
        micro = [merge_batches(micro)] if one_mb else micro
        feed = [pack_reference(b) for b in micro] if packed else list(micro)
        if cuda:
            feed = [_pin(b) for b in feed]
        feeds.append(feed)
        shapes.append([tuple(b.input_ids.shape) for b in feed])
    targets = {}

    def step(feed) -> None:
        opt.zero_grad(set_to_none=True)
        for mb in feed:
            mb = mb.to(device, non_blocking=True) if cuda else mb
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                scores = packed_scores(model, mb, kind) if packed else \
                    padded_scores(model, mb, kind)
            scores = scores.float().view(-1, args.group_size)
            if scores.shape[0] not in targets:  # the positive is each group's first document
                targets[scores.shape[0]] = torch.zeros(scores.shape[0], dtype=torch.long,
                                                       device=device)
            loss = F.cross_entropy(scores, targets[scores.shape[0]]) / len(feed)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return Prepared(step, feeds, shapes, info)


def packing_source() -> Path | None:
    """megarank/data/packing.py where megarank is importable from, found without importing."""
    import importlib.util

    spec = importlib.util.find_spec("megarank")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "packing.py"
    return path if path.is_file() else None


def prepare_megarank(args, system: str, kind: str, steps: list, device) -> Prepared:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.parallel.megatron import build_optimizer
    from megarank.training.step import StepCounters, make_forward_step, train_step

    packing = system.startswith("megarank-packed")
    pack_batch = None
    if packing:
        try:
            from megarank.data.packing import pack_batch
        except ImportError as e:
            raise NotAvailable(f"megarank.data.packing.pack_batch not importable ({e})") from e
    one_mb = system.endswith("-1mb")
    cuda = device.type == "cuda"
    micro_groups = args.groups * (args.micro_batches if one_mb else 1)
    n_steps = args.warmup + args.steps + 4
    overrides = [f"model={preset(args, kind)}", f"task.group_size={args.group_size}",
                 "pair.head=classifier", f"trainer.precision={'bf16' if cuda else 'fp32'}",
                 f"pair.max_length={_max_length(args)}",
                 f"trainer.micro_batch_size={micro_groups}",
                 f"trainer.global_batch_size={args.groups * args.micro_batches}",
                 f"trainer.max_steps={n_steps}", f"trainer.kernels={args.kernels}",
                 f"trainer.seed={args.seed}", f"optim.lr={args.lr}",
                 "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
                 "model.tokenizer=${asset:tokenizers/bert-uncased}"]
    if packing:
        overrides += ["data.packing=true", f"data.packed_multiple={args.packed_multiple}"]
    try:
        cfg = compose(overrides)
    except Exception as e:
        if packing:
            raise NotAvailable(f"config without data.packing ({type(e).__name__})") from e
        raise
    bundle = build_bundle(cfg, load_hf=False, device=device.type).__enter__()
    try:
        d, runtime, model = bundle.derived, bundle.runtime, bundle.model
        optimizer, scheduler = build_optimizer(cfg, model)
        fwd = make_forward_step(cfg.task, runtime.device, StepCounters())
        fb = get_forward_backward_func()
        feeds, shapes = [], []
        for micro in steps:
            micro = [merge_batches(micro)] if one_mb else micro
            if packing:
                micro = [pack_batch(b, args.packed_multiple) for b in micro]
            if cuda:
                micro = [_pin(b) for b in micro]
            feeds.append(micro)
            shapes.append([tuple(b.input_ids.shape) for b in micro])
        if d.num_microbatches != len(feeds[0]):
            raise RuntimeError(f"megarank runs {d.num_microbatches} micro-batches a step, the "
                               f"feed has {len(feeds[0])}")

        def step(feed) -> None:
            train_step(fb, fwd, iter(feed), model, optimizer, scheduler, d.num_microbatches,
                       int(feed[0].input_ids.shape[1]), d.pairs_per_micro_batch)

        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info = {"dtype": cfg.trainer.precision,
                "attention": f"kernels {bundle.kernels.name} ({bundle.kernels.reason})",
                # what the optimizer keeps beyond a bf16 loop: fp32 main weights
                "main_weights_gib": 0.0 if cfg.trainer.precision == "fp32" else
                trained * 4 / 2**30}
        return Prepared(step, feeds, shapes, info,
                        close=lambda: bundle.__exit__(None, None, None))
    except BaseException:
        bundle.__exit__(None, None, None)
        raise


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def gpu_busy(prof, wall_s: float) -> float:
    """Union of the device activity intervals (kernels, copies) recorded by ``prof`` / wall."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:  # no device events listed apart: the device time the operators report
        return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / wall_s
    busy, end = 0.0, -math.inf
    for s, e in spans:
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy / 1e6 / wall_s


def count_syncs(run, cuda: bool) -> tuple[int, dict]:
    """Host synchronisations during ``run()``: CUDA's sync debug mode warnings, or SyncCounter."""

    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in caught if "synchroniz" in str(w.message)]
        where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits)
        return len(hits), dict(where.most_common(6))
    with SyncCounter() as sc:
        run()
    return sc.total, dict(sc.counts)


def measure(args, prep: Prepared, device) -> dict:

    cuda = device.type == "cuda"
    nfeeds = len(prep.feeds)

    def one(i: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prep.step(prep.feeds[i % nfeeds])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = [one(i) for i in range(args.warmup)]  # cycles through the timed batches
    timed = [one(i) for i in range(args.steps)]
    out: dict = {
        "step_s": statistics.median(timed),
        "cold_s": statistics.mean(warm[:20]) if warm else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "shapes": len({s for per_step in prep.shapes for s in per_step}),
        "padded_tokens": statistics.mean(sum(a * b for a, b in per_step)
                                         for per_step in prep.shapes),
    }
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(3):
                prep.step(prep.feeds[i % nfeeds])
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        out["gpu_busy"] = gpu_busy(prof, wall)
    else:
        out["gpu_busy"] = None
    out["syncs"], out["sync_detail"] = count_syncs(lambda: prep.step(prep.feeds[0]), cuda)
    with OpCounter() as ops:
        prep.step(prep.feeds[0])
    out["ops_per_micro_batch"] = ops.count / len(prep.feeds[0])
    return out


def preset(args, kind: str) -> str:
    return GEOMETRIES[kind][1 if args.smoke or args.tiny else 0]


def _max_length(args) -> int:
    return -(-args.seq // args.pad_multiple) * args.pad_multiple


def run_system(args, system: str, kind: str) -> dict:
    """One system on one geometry, in this process: the measured row."""
    from megarank.config import compose
    from megarank.training.flops import mfu, step_flops

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model_cfg = compose([f"model={preset(args, kind)}"]).model
    steps = synthetic_steps(args, kind, int(model_cfg.vocab_size))
    if system.startswith("megarank"):
        prep = prepare_megarank(args, system, kind, steps, device)
    else:
        prep = prepare_hf(args, system, kind, model_cfg, steps, device)
    try:
        row = measure(args, prep, device)
    finally:
        if prep.close is not None:
            prep.close()
    real = [b.attention_mask.sum(1).tolist() for b in steps[0]]
    pairs = sum(len(r) for r in real)
    # Real tokens and FLOPs: the mean over the timed steps (the same batches for every system).
    tokens = statistics.mean(sum(b.num_real_tokens for b in micro) for micro in steps)
    flops = statistics.mean(
        step_flops(model_cfg, [n for b in micro for n in b.attention_mask.sum(1).tolist()],
                   head="classifier") for micro in steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    achieved = flops / row["step_s"]
    m = mfu(achieved, name) if device.type == "cuda" else None
    row.update(prep.info, status="ok", pairs=pairs, real_tokens=tokens,
               pairs_per_s=pairs / row["step_s"], tokens_per_s=tokens / row["step_s"],
               tflops=achieved / 1e12, mfu=m[0] if m else None, mfu_peak=m[1] if m else None)
    return row


def environment() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:
        mcore = "not installed"
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "megatron_core": mcore}


def child(args) -> None:
    """``--system NAME --json OUT``: run one system (or several, comma-separated, one after
    another: --smoke) on the requested geometries, write rows."""

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    env = environment()
    for system, kind in [(s, k) for s in args.system.split(",") for k in geometries(args)]:
        base = {"system": system, "geometry": kind, **env}
        try:
            rows.append({**base, **run_system(args, system, kind)})
        except NotAvailable as e:
            rows.append({**base, "status": "not available", "reason": str(e)})
        except Exception as e:
            traceback.print_exc()
            rows.append({**base, "status": "failed",
                         "reason": f"{type(e).__name__}: {e}".replace("\n", " ")[:300]})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(rows, indent=1))


# --------------------------------------------------------------------------------------------
# The parent: one process a system, then the tables
# --------------------------------------------------------------------------------------------

def geometries(args) -> list[str]:
    return ["decoder", "encoder"] if args.geometry == "both" else [args.geometry]


CHILD_FLAGS = ("seq", "groups", "group_size", "micro_batches", "steps", "warmup", "lengths",
               "pad_multiple", "packed_multiple", "seed", "lr", "kernels", "threads")


def launch(args, system: str, geometry: str, tmp: Path) -> list[dict]:
    """Run ``system`` (comma-separated: several, one after another) in a fresh process; its rows
    (or failure rows)."""
    out = tmp / f"{system.replace(',', '+')}-{geometry}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--system", system, "--geometry",
           geometry, "--json", str(out)]
    for f in CHILD_FLAGS:
        cmd += [f"--{f.replace('_', '-')}", str(getattr(args, f))]
    cmd += ["--smoke"] * args.smoke + ["--cpu"] * args.cpu + ["--tiny"] * args.tiny
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout,
                              env=env, cwd=REPO)
        err = proc.stderr
    except subprocess.TimeoutExpired as e:
        proc, err = None, f"timed out after {args.child_timeout} s " + str(e.stderr or "")[-500:]
    print(f"  {system} ({geometry}): {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)
    if proc is not None and proc.returncode == 0 and out.is_file():
        rows = json.loads(out.read_text())
        for r in rows:
            if r.get("status") == "failed":
                print(f"--- {system} ({r['geometry']}) failed; stderr tail:\n{err[-3000:]}",
                      file=sys.stderr)
        return rows
    print(f"--- {system} ({geometry}) exited; stderr tail:\n{err[-3000:]}", file=sys.stderr)
    reason = err.strip().splitlines()[-1][:200] if err.strip() else "no output"
    return [{"system": name, "geometry": g, "status": "failed", "reason": reason}
            for name in system.split(",")
            for g in (["decoder", "encoder"] if geometry == "both" else [geometry])]


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


MEGARANK_BEST = ("megarank-packed-1mb", "megarank-packed", "megarank")
"""megarank's rows, fastest layout first: the one the speed targets are read from."""


Target = tuple[str, str, str, str, bool]
"""(target, system, measured, needed, met)."""


def targets(args, kind: str, rows: list[dict]) -> list[Target]:
    """The speed targets this table can answer, read off megarank's best row (packed in one
    micro-batch where it ran): :func:`_gpu_targets` for a table measured on a GPU,
    :func:`_cpu_targets` (the proxies) otherwise. A target whose rows are missing is left
    out."""
    ok = {r["system"]: r for r in rows if r.get("status") == "ok"}
    best = next((ok[s] for s in MEGARANK_BEST if s in ok), None)
    if best is None:
        return []
    if best.get("gpu_busy") is not None:  # measured on a GPU
        return _gpu_targets(args, kind, best, ok)
    return _cpu_targets(args, best, ok)


def _gpu_targets(args, kind: str, best: dict, ok: dict[str, dict]) -> list[Target]:
    """Against the HF loop: 2.2x on the decoder, 2x on the encoder, 3x with the realistic
    length mix; at least the padding-free reference's pairs/s in the same run and at most its
    peak memory plus megarank's fp32 main weights; on the decoder with uniform lengths, MFU at
    real tokens 40%, the GPU busy 90% of the step, the first steps from cold at most 1.3x the
    steady step."""
    name, hf, ref = best["system"], ok.get(BASELINE), ok.get("packed-ref-1mb")
    out: list[Target] = []
    if hf is not None:
        need = 3.0 if args.lengths == "realistic" else 2.2 if kind == "decoder" else 2.0
        ratio = best["pairs_per_s"] / hf["pairs_per_s"]
        out.append((f"pairs/s against {BASELINE}", name, f"{ratio:.2f}x", f">= {need}x",
                    ratio >= need))
    if ref is not None:
        out.append(("pairs/s against the padding-free reference", name,
                    f"{best['pairs_per_s']:.1f} / {ref['pairs_per_s']:.1f}", ">= 1.00x",
                    best["pairs_per_s"] >= ref["pairs_per_s"]))
        if best.get("peak_gib") is not None and ref.get("peak_gib") is not None:
            bound = ref["peak_gib"] + best.get("main_weights_gib", 0.0)
            out.append(("peak memory: the reference's + fp32 main weights", name,
                        f"{best['peak_gib']:.1f} GiB", f"<= {bound:.1f} GiB",
                        best["peak_gib"] <= bound))
    if kind == "decoder" and args.lengths == "uniform":
        if best.get("mfu") is not None:
            out.append(("MFU at real tokens", name, f"{best['mfu']:.1%}", ">= 40%",
                        best["mfu"] >= 0.40))
        out.append(("GPU busy", name, f"{best['gpu_busy']:.0%}", ">= 90%",
                    best["gpu_busy"] >= 0.90))
        if best.get("cold_s") is not None:
            cold = best["cold_s"] / best["step_s"]
            out.append((f"first {min(20, args.warmup)} steps from cold / steady", name,
                        f"{cold:.2f}x", "<= 1.3x", cold <= 1.3))
    return out


def _cpu_targets(args, best: dict, ok: dict[str, dict]) -> list[Target]:
    """The CPU proxies: host synchronisations a step at most 2, distinct shapes over 100 steps
    at most 8 and padding under 3% (packed), operators a micro-batch no more than the HF
    loop's (padded megarank, the same micro-batches)."""
    name, hf, padded = best["system"], ok.get(BASELINE), ok.get("megarank")
    out: list[Target] = [("host syncs a step", name, str(best["syncs"]), "<= 2",
                          best["syncs"] <= 2)]
    if args.steps + args.warmup + 4 >= 100:
        out.append(("distinct shapes over the steps", name, str(best["shapes"]), "<= 8",
                    best["shapes"] <= 8))
    if name.startswith("megarank-packed"):
        pad = 1 - best["real_tokens"] / best["padded_tokens"]
        out.append(("padding, packed", name, f"{pad:.1%}", "< 3%", pad < 0.03))
    if padded is not None and hf is not None:
        out.append((f"operators a micro-batch against {BASELINE}", "megarank",
                    f"{padded['ops_per_micro_batch']:.0f} / {hf['ops_per_micro_batch']:.0f}",
                    "<= 1.00x", padded["ops_per_micro_batch"] <= hf["ops_per_micro_batch"]))
    return out


def print_table(args, kind: str, rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    env = ok[0] if ok else rows[0]
    print(f"\n### {kind}: {preset(args, kind)} geometry, seq {args.seq} ({args.lengths} lengths), "
          f"{args.groups} groups x {args.group_size} docs x {args.micro_batches} micro-batches "
          f"= {args.groups * args.group_size * args.micro_batches} pairs a step; "
          f"{args.warmup} warm-up + {args.steps} timed steps\n")
    print(f"device: {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers "
          f"{env.get('transformers', '?')}, megatron-core {env.get('megatron_core', '?')}\n")
    print("| system | pairs/s | real tok/s | MFU (real tok) | TFLOP/s (real) | step s "
          "| cold s/step | peak GiB | GPU busy | syncs/step | ops/micro-batch | shapes "
          "| padded tok/step | pad % | vs hf-bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = next((r for r in ok if r["system"] == BASELINE), None)
    for r in rows:
        if r.get("status") != "ok":
            print(f"| {r['system']} | {r.get('status')}: {r.get('reason', '')} "
                  "| | | | | | | | | | | | | |")
            continue
        pad = 1 - r["real_tokens"] / r["padded_tokens"]
        ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "n/a"
        print(f"| {r['system']} | {r['pairs_per_s']:.1f} | {r['tokens_per_s']:.0f} "
              f"| {_fmt(r['mfu'], '.1%')} | {r['tflops']:.2f} | {r['step_s']:.4f} | {_fmt(r['cold_s'], '.4f')} "
              f"| {_fmt(r['peak_gib'], '.2f')} | {_fmt(r['gpu_busy'], '.0%')} | {r['syncs']} "
              f"| {r['ops_per_micro_batch']:.0f} | {r['shapes']} | {r['padded_tokens']:.0f} | {pad:.1%} | {ratio} |")
    print()
    peak = next((r["mfu_peak"] for r in ok if r.get("mfu_peak")), None)
    if peak:
        print(f"- MFU: model FLOPs of the real tokens over the dense bf16 peak of {peak}.")
    for r in ok:
        print(f"- {r['system']}: {r['dtype']}; attention: {r['attention']}; syncs: "
              f"{r['sync_detail'] or 'none'}")
    for r in ok:
        if r.get("parity") is not None:
            print(f"packed-ref parity max |d| = {r['parity']:.3g} ({kind}, {r['system']}, "
                  f"{r['parity_dtype']}: packed scores vs the padded HF model's, same pairs)")
    checks = targets(args, kind, rows)
    if checks:
        print(f"\n| target ({kind}, {args.lengths} lengths) | system | measured | needed | met |")
        print("|---|---|---|---|---|")
        for what, system, value, need, met in checks:
            print(f"| {what} | {system} | {value} | {need} | {'yes' if met else '**no**'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="both", choices=("decoder", "encoder", "both"))
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    ap.add_argument("--seq", type=int, default=512, help="longest pair in tokens")
    ap.add_argument("--groups", type=int, default=2, help="query groups per micro-batch")
    ap.add_argument("--group-size", type=int, default=8, help="documents per group")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=15,
                    help="warm-up steps (cycling through the timed batches); the first "
                         "min(20, warmup) are reported as the cold-start step time")
    ap.add_argument("--lengths", default="uniform", choices=("uniform", "realistic"))
    ap.add_argument("--pad-multiple", type=int, default=8,
                    help="padded widths are a multiple of this (megarank's data default)")
    ap.add_argument("--packed-multiple", type=int, default=64,
                    help="megarank's packed rows are a multiple of this wide "
                         "(data.packed_multiple; its default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kernels", default="auto", help="megarank's trainer.kernels")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is")
    ap.add_argument("--child-timeout", type=int, default=1800, help="seconds per system process")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads in each system process (0: torch's default)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="system processes run at once; keep 1 for timings on a GPU")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models (gpt_tiny, bert_tiny), CPU, fp32, seq 64, 2 + 2 steps")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny models (gpt_tiny, bert_tiny) at the sizes given: the CPU "
                         "proxies (host waits, operators, shapes, padding) over a real run")
    ap.add_argument("--system", help=argparse.SUPPRESS)  # internal: run one system
    ap.add_argument("--json", help=argparse.SUPPRESS)  # internal: where its rows go
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.steps, args.warmup, args.cpu = 64, 2, 2, True
        args.child_timeout = min(args.child_timeout, 300)
        # One thread a process, two processes at once: a 2-core machine shared with other work
        # (several threads a process spin against each other there).
        args.threads, args.jobs = args.threads or 1, max(args.jobs, 2)
    if args.system:
        child(args)
        return

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    has_packing = packing_source() is not None
    rows: dict[str, list[dict]] = {g: [] for g in geometries(args)}
    runs = [(s, g) for g in ([args.geometry] if args.smoke else geometries(args))
            for s in systems]
    with tempfile.TemporaryDirectory() as tmp:
        todo = []
        for system, geometry in runs:
            if system.startswith("megarank-packed") and not has_packing:
                for g in geometries(args) if geometry == "both" else [geometry]:
                    rows[g].append({"system": system, "geometry": g, "status": "not available",
                                    "reason": "megarank.data.packing is not there yet"})
            else:
                todo.append((system, geometry))
        if args.smoke:
            # --smoke checks the script, not the figures: one process for the Hugging
            # Face systems and one for megarank's, both geometries each (a fraction of the
            # start-up).
            todo = [(",".join(s for s, _ in group), args.geometry) for group in (
                [sg for sg in todo if not sg[0].startswith("megarank")],
                [sg for sg in todo if sg[0].startswith("megarank")]) if group]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for result in pool.map(lambda sg: launch(args, *sg, Path(tmp)), todo):
                for r in result:
                    rows[r["geometry"]].append(r)
    for g in geometries(args):
        order = {s: i for i, s in enumerate(systems)}
        print_table(args, g, sorted(rows[g], key=lambda r: order[r["system"]]))


if __name__ == "__main__":
    main()
