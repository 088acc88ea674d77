"""Parameters per GPU: one transformer layer, LoRA adapters, the head and each pipeline stage, as
megarank builds them (column/row-parallel weights split over TP)."""

from __future__ import annotations

from typing import Any

from megarank.config import ENCODER_FAMILIES, padded_vocab_size


def geometry(m: Any) -> tuple[int, int, int, int, int]:
    """(hidden, query heads, key/value heads, head dim, FFN width) of the model group."""
    h, nq = int(m.hidden_size), int(m.num_attention_heads)
    nkv = int(m.num_query_groups or nq)
    d = int(m.head_dim or h // nq)
    return h, nq, nkv, d, int(m.ffn_hidden_size)


def layer_params(m: Any, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank (column/row-parallel weights split,
    norms and row-parallel biases replicated)."""
    h, nq, nkv, d, ffn = geometry(m)
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


def dora_saved_per_token(cfg: Any, tp: int, width: int) -> int:
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
    return 2 * rows * width


def linear_weights(m: Any, tp: int) -> int:
    """Weights (not biases) of one layer's four linears on one TP rank: what QLoRA stores 4-bit."""
    h, nq, nkv, d, ffn = geometry(m)
    fc1 = ffn * (2 if m.gated_linear_unit else 1)
    return (h * (nq + 2 * nkv) * d + nq * d * h + h * fc1 + ffn * h) // tp


def head_params(cfg: Any) -> int:
    """Trainable head parameters of the last stage (the classifier; a yes/no head is the
    vocabulary)."""
    m, h = cfg.model, int(cfg.model.hidden_size)
    if cfg.pair.head == "yes_no":
        return 0
    return h * h + h + h + 1 if m.family in ENCODER_FAMILIES else h


def relative_params(m: Any) -> int:
    """DeBERTa's relative-position table (2 * span rows) and its LayerNorm, held by every
    pipeline stage (with share_att_key, position queries and keys are projected by the layers'
    QKV weights; otherwise see position_projection_params)."""
    if m.family != "deberta":
        return 0
    h = int(m.hidden_size)
    return 2 * relative_span(m) * h + (2 * h if m.norm_rel_ebd == "layer_norm" else 0)


def position_projection_params(m: Any, tp: int) -> int:
    """One layer's DeBERTa position projections on one TP rank when share_att_key is false:
    pos_key_proj (c2p) and pos_query_proj (p2c), each column-parallel [h, heads * d] + bias."""
    if m.family != "deberta" or m.share_att_key:
        return 0
    h, nq, _, d, _ = geometry(m)
    return len(m.pos_att_type) * (h * nq * d + nq * d) // tp


def relative_span(m: Any) -> int:
    """DeBERTa's span: position_buckets when positive, else max_relative_positions, else
    max_position_embeddings (its table has 2 * span rows)."""
    if int(m.position_buckets) > 0:
        return int(m.position_buckets)
    if int(m.max_relative_positions) >= 1:
        return int(m.max_relative_positions)
    return int(m.max_position_embeddings)


def stage_params(cfg: Any, tp: int, pp: int, stage: int) -> int:
    """Parameters of pipeline stage ``stage`` on one of its TP ranks, as megarank builds it."""
    m = cfg.model
    h = int(m.hidden_size)
    first, last = stage == 0, stage == pp - 1
    n = int(m.num_layers) // pp * (layer_params(m, tp) + position_projection_params(m, tp))
    n += relative_params(m)
    vocab_rows = padded_vocab_size(m) // tp
    if first:
        n += vocab_rows * h
        if m.family == "bert" or (m.family == "deberta" and m.position_biased_input):
            n += int(m.max_position_embeddings) * h
        if m.family in ENCODER_FAMILIES:
            n += int(m.type_vocab_size) * h + 2 * h
    if last:
        if m.family not in ENCODER_FAMILIES:
            n += 2 * h if m.normalization == "LayerNorm" else h  # final norm
        if cfg.pair.head == "yes_no":
            # The LM output layer: its own vocab-parallel copy unless tied on a single stage.
            if not (m.tie_word_embeddings and first):
                n += vocab_rows * h
        elif m.family in ENCODER_FAMILIES:
            n += h * h + h + h + 1  # pooler / dense (h x h + bias), score (h + bias)
        else:
            n += h  # score, no bias
    return n


def total_params(cfg: Any) -> int:
    """Parameters of the whole model on one process (tp1 pp1)."""
    return stage_params(cfg, 1, 1, 0)
