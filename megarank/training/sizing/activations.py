"""Activation bytes autograd keeps for backward: one transformer layer written as terms for the
kernels megarank runs (:func:`layer_terms`), the paper's layer (:func:`paper_layer_terms`,
:func:`korthikanti_layer_bytes`), the tensors outside the layers and the head's. The sources and
the kernel-by-kernel reasoning are in the package docstring (``megarank.training.sizing``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from megarank.training.sizing.params import geometry, relative_span
from megarank.training.sizing.records import FP32, INT64, RECOMPUTE, WIDTH, Term


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
    """Attention dropout on the CPU: megarank.models.attention's unfused dropout attention."""
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

    def norm(self, label: str, keep_input: bool = True) -> list[Term]:
        """A norm's terms: its input (unless counted already), normalised x, statistics."""
        t = [Term(f"{label} input", self.hs, self.nw)] if keep_input else []
        if self.composite:
            t.append(Term(f"{label} normalised x", self.hs, FP32))
        t.append(Term(f"{label} statistics", self.stats * self.tok, self.sw))
        return t


def _layer(cfg: Any, tp: int, device: str, length: int) -> _Layer:
    m, p, trainer = cfg.model, cfg.parallel, cfg.trainer
    h, nq, nkv, d, ffn = geometry(m)
    a = WIDTH[trainer.precision]
    sp = bool(p.sequence_parallel)
    cpu = device == "cpu"
    rms = m.normalization == "RMSNorm"
    composite = cpu and rms
    return _Layer(
        a=a, hs=h / tp if sp else h, tok=1 / tp if sp else 1, nq_t=nq / tp, nkv_t=nkv / tp,
        ffn_t=ffn / tp, qkv_t=(nq + 2 * nkv) * d / tp, d=d, length=length, cpu=cpu,
        composite=composite, math_path=cpu and float(m.attention_dropout or 0.0) > 0,
        drop=float(m.hidden_dropout or 0.0) > 0, bert=m.family in ("bert", "deberta"),
        rope=m.family == "gpt", gqa=nkv != nq, stats=1 if rms else 2,
        nw=FP32 if composite else a, sw=a if (cpu and not rms) else FP32,
    )


def layer_terms(cfg: Any, tp: int, device: str, length: int) -> list[Term]:
    """The activation terms of one transformer layer on one GPU, as megarank builds the layer
    for ``device`` (``cpu``: megatron's local layers + SDPA on the CPU; ``cuda``: TE or fused
    kernels and flash attention). ``length`` enters only the unfused attention terms."""
    x = _layer(cfg, tp, device, length)
    t = _input_terms(x)
    if cfg.model.qk_layernorm:
        t += _qk_norm_terms(x)
    if cfg.model.family == "deberta":
        t += _disentangled_attention_terms(x, cfg.model)
    else:
        t += _math_attention_terms(x) if x.math_path else _fused_attention_terms(x)
    if x.rope and x.cpu:
        # Unfused RoPE: cos and sin, for q and for k, computed again in every layer.
        t.append(Term("RoPE cos/sin", 4 * x.d, x.a, per_position=True))
    after = _after_core_terms(x, bool(cfg.model.gated_linear_unit))
    return t + [replace(term, after_core=True) for term in after]


# The terms of the core attention a pooled layer keeps for its pooled queries only.
_QUERY_SIDE = ("scaled query (fp32)", "attention probabilities (fp32)", "attention dropout mask",
               "dropped attention probabilities (fp32)", "softmax log-sum-exp")


def pooled_in_plan(cfg: Any, device: str) -> bool:
    """The last stage's last layer computes the pooled rows only (trainer.pooled_last_layer;
    megarank.models.pooling): megarank's local layers with SDPA, not DeBERTa, not sequence
    parallel. On CUDA the plan takes the local layers when trainer.kernels says so."""
    m, trainer = cfg.model, cfg.trainer
    return (bool(trainer.pooled_last_layer) and m.family != "deberta"
            and not cfg.parallel.sequence_parallel
            and (device == "cpu" or trainer.kernels == "local"))


def pooled_layer_terms(cfg: Any, tp: int, device: str, length: int) -> list[Term]:
    """:func:`layer_terms` of a layer computed for one pooled row per sequence: what comes
    before the core attention, the keys and values, for every token; the queries, their
    attention probabilities and everything after the core attention for the pooled rows
    (a per-token term divided by ``length``: one row per sequence)."""
    x = _layer(cfg, tp, device, length)
    per_row = []
    for term in layer_terms(cfg, tp, device, length):
        # Selective recompute leaves the pooled core attention alone (megarank.models.pooling.
        # set_pooled): what it keeps is kept in both modes, and nothing for a recompute.
        if term.kept == ("selective",):
            continue
        if term.kept == ("none",):
            term = replace(term, kept=("none", "selective"))
        if term.after_core or term.name in _QUERY_SIDE:
            per_row.append(replace(term, elements=term.elements / length))
        elif term.name == "query (after RoPE)":  # SDPA keeps the selected rows
            per_row.append(replace(term, name="pooled query", elements=term.elements / length))
        else:
            per_row.append(term)
    if not x.rope:  # an encoder's query was a view of the QKV output; now a gathered copy
        per_row.append(Term("pooled query", x.nq_t * x.d / length, x.a))
    if x.rope:  # the pooled queries' causal limit: a [b, 1, 1, s] mask
        per_row.append(Term("pooled causal mask", 1, 1 if x.math_path else
                            (x.a if x.cpu else 1)))
    per_row.append(Term("pooled-row indices", 3 / length, INT64, RECOMPUTE))
    return per_row


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
    """The unfused dropout attention on the CPU (megarank.models.attention.attend), computed in
    fp32 as SDPA's math kernel is: the [s, s] probabilities and dropout mask, which selective
    recompute drops with the rest of the core attention's own tensors."""
    a, d, core = x.a, x.d, ("none",)
    t = [Term("scaled query (fp32)", x.nq_t * d, FP32, core)]
    if x.rope and x.gqa:
        t.append(Term("key, repeated to the query heads (fp32)", x.nq_t * d, FP32, core))
        t.append(Term("value, repeated to the query heads (fp32)", x.nq_t * d, FP32, core))
    else:
        # Decoders' key is RoPE's output (also the recompute's input); in fp32 an encoder's key
        # and value reach the matmuls as strided views of the QKV output, in half precision as
        # fp32 copies.
        if x.rope:
            t.append(Term("key (after RoPE)", x.nkv_t * d, a))
        if a != FP32:  # the copies are kept, not the QKV output they were made from
            t.append(Term("key (fp32 copy)", x.nkv_t * d, FP32, core))
            t.append(Term("value (fp32 copy)", x.nkv_t * d, FP32, core))
        else:
            t.append(Term("QKV output (held by the key and value views)", x.qkv_t, a))
    t += _dropout_probability_terms(x, core)
    if x.rope and x.gqa:  # selective recompute keeps the core attention's inputs instead
        t.append(Term("query (after RoPE), kept for recompute", x.nq_t * d, a, ("selective",)))
        t.append(Term("key (after RoPE), kept for recompute", x.nkv_t * d, a, ("selective",)))
        t.append(Term("QKV output (value view), kept for recompute", x.qkv_t, a,
                      ("selective",)))
    elif x.rope:
        t.append(Term("query (after RoPE), kept for recompute", x.nq_t * d, a, ("selective",)))
    return t


def _dropout_probability_terms(x: _Layer, core: tuple[str, ...]) -> list[Term]:
    """The [s, s] tensors of attention dropout on the CPU (megarank.models.attention.attend):
    the softmax's output, the bool dropout mask and the kept probabilities, fp32."""
    n = x.nq_t * x.length
    return [Term("attention probabilities (fp32)", n, FP32, core),
            Term("attention dropout mask", n, 1, core),
            Term("dropped attention probabilities (fp32)", n, FP32, core)]


def _disentangled_attention_terms(x: _Layer, m: Any) -> list[Term]:
    """DeBERTa's core attention (megarank.models.deberta): per position term, a copy of the
    queries (c2p) or keys (p2c) and their [s, 2 span] scores against the table, which the
    gather keeps; SDPA with an additive mask that needs a gradient takes its math path (scaled
    query and key copies, [s, s] probabilities); the [s, s] bucket index per layer.
    Selective recompute keeps only the inputs (the QKV output). Measured on the CPU in fp32."""
    a, d, core = x.a, x.d, ("none",)
    span2 = 2 * relative_span(m)
    t = [Term("QKV output (held by the value view)", x.qkv_t, a)]
    for term, heads in (("c2p", x.nq_t), ("p2c", x.nkv_t)):
        if term in m.pos_att_type:
            t.append(Term(f"{term}: query/key copy", heads * d, a, core))
            t.append(Term(f"{term}: scores against the table", x.nq_t * span2, a, core))
    for name in ("scaled query", "key copy"):  # the value: a view of the QKV output
        t.append(Term(name, x.nq_t * d, a, core))
    if x.math_path:  # attention dropout
        t += _dropout_probability_terms(x, core)
    else:  # SDPA's math path for the additive mask
        t.append(Term("attention probabilities", x.nq_t * x.length, a, core))
    t.append(Term("relative-position index", x.length, INT64, per_position=True))
    t.append(Term("padding mask", 1, 1, core))
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
        t.append(Term("attention dropout-add mask", x.hs, 1))
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
        t.append(Term("MLP dropout-add mask", x.hs, 1))
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


def kept_bytes(terms: list[Term], mode: str, sequences: int, length: int) -> float:
    """Bytes of the terms ``mode`` keeps, for ``sequences`` x ``length`` tokens."""
    return sum(x.bytes(sequences, length) for x in terms if mode in x.kept)


def stage_terms(cfg: Any, tp: int, pp: int, stage: int, device: str) -> list[Term]:
    """Activation terms outside the transformer layers on one stage: the embeddings (first
    stage), tensors shared by every layer of the stage, the final norm (last; of the pooled
    rows only after a pooled last layer)."""
    m, trainer = cfg.model, cfg.trainer
    h = int(m.hidden_size)
    a = WIDTH[trainer.precision]
    sp = bool(cfg.parallel.sequence_parallel)
    hs = h / tp if sp else h
    cpu = device == "cpu"
    bert = m.family in ("bert", "deberta")
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
        rows = 1 / int(cfg.pair.max_length) if pooled_in_plan(cfg, device) else 1
        t.append(Term("final norm input", hs * rows, FP32 if composite else a, RECOMPUTE))
        if composite:
            t.append(Term("final norm normalised x", hs * rows, FP32, RECOMPUTE))
        rms = m.normalization == "RMSNorm"
        t.append(Term("final norm statistics", (1 if rms else 2) / (tp if sp else 1) * rows,
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
    if cfg.pair.head == "yes_no":
        states, fixed = h * a, 2 * h * a
    elif m.family == "gpt":
        states, fixed = (dropped if p > 0 else h * a), 0
    elif m.encoder_head in ("roberta", "deberta"):  # dropout, dense, tanh/GELU, dropout, out
        states, fixed = (2 * dropped + h * a if p > 0 else 2 * h * a), 0
    else:  # BERT: dense (pooler), tanh, dropout, classifier
        states, fixed = 2 * h * a + (dropped if p > 0 else 0), 0
    per_seq = 2 * INT64 + states + FP32  # pooling rows and columns, states, the score
    groups = sequences // int(cfg.task.group_size)
    return per_seq * sequences + fixed + groups * INT64 + FP32
