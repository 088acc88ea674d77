"""Hugging Face conversion: HF config -> model config, HF weights -> any layout, model -> HF files.

Import is per rank and streaming: each rank reads, one tensor at a time, only the HF tensors its
own parameters are made of, and of a tensor-parallel parameter only its slice (safetensors
``get_slice``: the rows, or columns, of its query groups, of its gate and up halves, of its
vocabulary range), then fuses them (QKV, gate/up). Export works from a single-process (tp1_pp1)
model, which megatron's distributed checkpoints reshard into from any training layout.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megarank.checkpoint.hf_mappings import BASE_PREFIXES, Rule, rules_for

ENCODERS = ("bert", "roberta", "xlm-roberta")
DEBERTA = ("deberta-v2",)
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = ENCODERS + DEBERTA + DECODERS


class ConversionError(ValueError):
    """An HF model or checkpoint megarank cannot represent exactly; the message says why."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF model directory."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {hf_dir} a Hugging Face model?)")
    return json.loads(path.read_text())


# Llama 3.x frequency-dependent RoPE scaling: HF rope_parameters key -> ModelConfig field.
_LLAMA3_ROPE = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_position_embeddings",
}


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig RoPE fields of an HF decoder config: theta, and Llama 3.x scaling.

    transformers 5 writes ``rope_parameters``; older configs ``rope_theta`` + ``rope_scaling``.
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{where}: partial_rotary_factor {partial} is not supported "
                              "(RoPE on the whole head only)")
    if rope_type == "default":
        return dict(rotary_base=theta, rope_scaling=None)
    if rope_type == "llama3":
        absent = [k for k in _LLAMA3_ROPE if k not in merged]
        if absent:
            raise ConversionError(f"{where}: rope_type 'llama3' without {', '.join(absent)}")
        return dict(rotary_base=theta, rope_scaling="llama3",
                    **{field: merged[k] for k, field in _LLAMA3_ROPE.items()})
    raise ConversionError(f"{where}: rope scaling {rope_type!r} is not supported (plain RoPE and "
                          "'llama3' are reproduced exactly)")


def model_overrides_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """ModelConfig fields that reproduce the HF model in ``hf_dir``; refuses what it cannot."""
    hf = read_hf_config(hf_dir)
    where = f"{Path(hf_dir) / 'config.json'}"
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ConversionError(f"{where}: model_type {mt!r} is not supported; megarank converts "
                              f"{', '.join(SUPPORTED)}")
    common = dict(
        hf_model_type=mt, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
        tokenizer=str(hf_dir), name=Path(hf_dir).name or mt,
    )
    if mt in ENCODERS:
        return dict(common, **_encoder_overrides(hf, mt, where))
    if mt in DEBERTA:
        return dict(common, **_deberta_overrides(hf, where))
    return dict(common, **_decoder_overrides(hf, mt, where))


def _encoder_overrides(hf: dict[str, Any], mt: str, where: str) -> dict[str, Any]:
    """The fields of a BERT-family encoder (post-LN, learned absolute positions, GELU)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{where}: position_embedding_type "
                              f"{hf['position_embedding_type']!r} is not supported "
                              f"({mt}: absolute)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
                              f"({mt}: gelu)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConversionError(f"{where}: is_decoder / add_cross_attention is not supported "
                              f"({mt} is imported as a bidirectional encoder)")
    roberta = mt != "bert"
    offset = 0
    if roberta:
        # fairseq's positions: pad_token_id + 1 for the first token, the rows below unused.
        if hf.get("pad_token_id") is None:
            raise ConversionError(f"{where}: {mt} without pad_token_id (its positions "
                                  "start at pad_token_id + 1)")
        offset = int(hf["pad_token_id"]) + 1
    return dict(
        family="bert", position_embedding_type="learned_absolute",
        normalization="LayerNorm", layernorm_epsilon=hf.get("layer_norm_eps", 1e-12),
        activation="gelu", gated_linear_unit=False, add_bias_linear=True, add_qkv_bias=True,
        type_vocab_size=hf.get("type_vocab_size", 2), position_offset=offset,
        encoder_head="roberta" if roberta else "bert",
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        classifier_dropout=hf.get("classifier_dropout"),
        num_query_groups=None, head_dim=None, qk_layernorm=False, rope_scaling=None,
        sliding_window=None,
    )


def _deberta_pos_att_type(hf: dict[str, Any], where: str) -> list[str]:
    """pos_att_type as a list ("p2c|c2p" in older configs); only c2p and p2c are supported."""
    raw = hf.get("pos_att_type") or []
    terms = [t.strip() for t in raw.lower().split("|")] if isinstance(raw, str) else list(raw)
    if any(t not in ("c2p", "p2c") for t in terms) or len(set(terms)) != len(terms):
        raise ConversionError(f"{where}: pos_att_type {raw!r} is not supported (a subset of "
                              "c2p and p2c)")
    return terms


def _deberta_refusals(hf: dict[str, Any], where: str) -> None:
    """DeBERTa-v2 settings megarank does not reproduce, each refused by its config.json field
    (absent fields take DebertaV2Config's defaults)."""
    h = hf["hidden_size"]
    refused = {
        "relative_attention": (not hf.get("relative_attention", False),
                               "false (megarank builds DeBERTa's relative attention only)"),
        "conv_kernel_size": (hf.get("conv_kernel_size", 0) > 0,
                             f"{hf.get('conv_kernel_size')} (the convolution layer beside the "
                             "first layer is not supported)"),
        "embedding_size": (hf.get("embedding_size", h) != h,
                           f"{hf.get('embedding_size')} != hidden_size {h} (embed_proj)"),
        "attention_head_size": (hf.get("attention_head_size", h // hf["num_attention_heads"])
                                != h // hf["num_attention_heads"],
                                f"{hf.get('attention_head_size')} != hidden_size / heads"),
        "pooler_hidden_size": (hf.get("pooler_hidden_size", h) != h,
                               f"{hf.get('pooler_hidden_size')} != hidden_size {h}"),
        "pooler_hidden_act": (hf.get("pooler_hidden_act", "gelu") != "gelu",
                              f"{hf.get('pooler_hidden_act')!r} (gelu only)"),
        "hidden_act": (hf.get("hidden_act", "gelu") != "gelu",
                       f"{hf.get('hidden_act')!r} (gelu only)"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ConversionError(f"{where}: {name} {why} is not supported")
    norm = [x.strip() for x in str(hf.get("norm_rel_ebd", "none")).lower().split("|")]
    if any(x not in ("layer_norm", "none") for x in norm):
        raise ConversionError(f"{where}: norm_rel_ebd {hf['norm_rel_ebd']!r} is not supported "
                              "(layer_norm or none)")


def _deberta_overrides(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of a DeBERTa-v2/v3 encoder (post-LN, disentangled relative attention, GELU)."""
    _deberta_refusals(hf, where)
    norm = "layer_norm" if "layer_norm" in str(hf.get("norm_rel_ebd", "none")).lower() else "none"
    return dict(
        family="deberta", position_embedding_type="relative",
        normalization="LayerNorm", layernorm_epsilon=hf.get("layer_norm_eps", 1e-7),
        activation="gelu", gated_linear_unit=False, add_bias_linear=True, add_qkv_bias=True,
        type_vocab_size=hf.get("type_vocab_size", 0), position_offset=0,
        encoder_head="deberta", position_buckets=hf.get("position_buckets", -1),
        max_relative_positions=hf.get("max_relative_positions", -1), norm_rel_ebd=norm,
        pos_att_type=_deberta_pos_att_type(hf, where),
        position_biased_input=bool(hf.get("position_biased_input", True)),
        share_att_key=bool(hf.get("share_att_key", False)),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        classifier_dropout=hf.get("cls_dropout"), pooler_dropout=hf.get("pooler_dropout", 0.0),
        num_query_groups=None, head_dim=None, qk_layernorm=False, rope_scaling=None,
        sliding_window=None,
    )


def _decoder_overrides(hf: dict[str, Any], mt: str, where: str) -> dict[str, Any]:
    """The fields of a Llama-family decoder (pre-RMSNorm, RoPE, SwiGLU)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
                              "(decoders: silu)")
    if hf.get("mlp_bias"):
        raise ConversionError(f"{where}: mlp_bias=true is not supported")
    if mt in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        raise ConversionError(f"{where}: attention_bias=true (o_proj bias) is not supported")
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{where}: use_sliding_window=true is not supported")
    # Mistral applies `sliding_window` to every layer; up to that many tokens it is full causal
    # attention, so it is kept and validate() holds pair.max_length to it. (Qwen2 configs carry a
    # sliding_window too, unused unless use_sliding_window.)
    window = hf.get("sliding_window") if mt == "mistral" else None
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    return dict(
        family="gpt", position_embedding_type="rope", **_rope(hf, where),
        sliding_window=window, position_offset=0, encoder_head="bert", classifier_dropout=None,
        normalization="RMSNorm", layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        activation="silu", gated_linear_unit=True, add_bias_linear=False,
        add_qkv_bias=mt == "qwen2", qk_layernorm=mt == "qwen3",
        num_query_groups=hf.get("num_key_value_heads", heads),
        head_dim=None if head_dim in (None, hf["hidden_size"] // heads) else head_dim,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_dropout=0.0, attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )


def apply_hf_config(cfg: Any) -> None:
    """When ``model.hf_path`` is set, fill the model group from the HF config (in place). The
    geometry is the checkpoint's; a dropout set in the config (not None) is kept, as
    ``from_pretrained(..., hidden_dropout_prob=0)`` keeps it."""
    if not cfg.model.hf_path:
        return
    for key, value in model_overrides_from_hf(cfg.model.hf_path).items():
        if key in _TRAINING_CHOICES and cfg.model[key] is not None:
            continue
        cfg.model[key] = value


_TRAINING_CHOICES = ("hidden_dropout", "attention_dropout", "classifier_dropout")
"""Model fields an HF config only defaults: regularisation, not geometry."""


# --------------------------------------------------------------------------------------------
# Reading HF tensors
# --------------------------------------------------------------------------------------------


class HFWeights:
    """Lazy access to an HF model's tensors by name (safetensors, sharded or not), whole or a
    slice along one dimension; ``bytes_read`` counts the tensor bytes handed out."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.bytes_read = 0
        self._bin: dict[str, torch.Tensor] | None = None
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.dir / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, "pt") as f:
                self.files = {k: single for k in f.keys()}  # noqa: SIM118 (not a dict)
        elif (self.dir / "pytorch_model.bin").is_file():
            # Pickled weights run code on load unless restricted to tensors.
            state = torch.load(self.dir / "pytorch_model.bin", map_location="cpu",
                               weights_only=True)
            self._bin = state
            self.files = {k: None for k in state}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors(.index.json) or "
                                    "pytorch_model.bin")
        # BertModel / XLMRobertaModel checkpoints (e.g. sentence-transformers) have no "bert." /
        # "roberta." prefix.
        self.headless = any(k.startswith("embeddings.") for k in self.files) and not any(
            k.startswith(BASE_PREFIXES) for k in self.files)

    def _key(self, name: str) -> str:
        if self.headless and name.startswith(BASE_PREFIXES):
            name = name.split(".", 1)[1]
        if name not in self.files:
            # Checkpoints from the original TF BERT port name LayerNorm parameters gamma / beta.
            legacy = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", name)
            legacy = re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", legacy)
            if legacy in self.files:
                return legacy
        return name

    def __contains__(self, name: str) -> bool:
        return self._key(name) in self.files

    def _present(self, name: str) -> str:
        key = self._key(name)
        if key not in self.files:
            raise KeyError(f"{self.dir}: no tensor {key!r}")
        return key

    @property
    def in_memory(self) -> bool:
        """Whether the weights were loaded whole (a pytorch_model.bin), so slicing saves nothing."""
        return self._bin is not None

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now."""
        key = self._present(name)
        if self._bin is not None:
            t = self._bin[key]
        else:
            with safe_open(self.files[key], "pt") as f:
                t = f.get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, from the file header (nothing read)."""
        key = self._present(name)
        if self._bin is not None:
            return list(self._bin[key].shape)
        with safe_open(self.files[key], "pt") as f:
            return list(f.get_slice(key).get_shape())

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) of a tensor along ``dim``, reading only those from disk."""
        key = self._present(name)
        if self._bin is not None:
            t = self._bin[key].narrow(dim, start, stop - start)
        else:
            with safe_open(self.files[key], "pt") as f:
                t = f.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]
        self.bytes_read += t.numel() * t.element_size()
        return t


# --------------------------------------------------------------------------------------------
# Transforms between HF tensors and full (unsharded) megarank tensors
# --------------------------------------------------------------------------------------------


def _qkv_geometry(model: Any) -> tuple[int, int, int]:
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.head_dim or model.hidden_size // heads
    return heads, groups, head_dim


def to_megarank(rule: Rule, tensors: list[torch.Tensor], model: Any, padded_vocab: int
                ) -> torch.Tensor:
    """HF tensors -> the full megarank tensor of ``rule``."""
    if rule.transform == "copy":
        return tensors[0]
    if rule.transform == "vocab":
        w = tensors[0]
        if w.shape[0] > padded_vocab:
            raise ConversionError(f"{rule.hf[0]} has {w.shape[0]} rows, more than the padded "
                                  f"vocabulary ({padded_vocab})")
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])
    if rule.transform == "gate_up":
        return torch.cat(tensors, dim=0)
    if rule.transform == "qkv":
        heads, groups, d = _qkv_geometry(model)
        return _interleave_qkv(*tensors, groups, heads // groups, d)
    raise ValueError(f"unknown transform {rule.transform!r}")


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int,
                    heads_per_group: int, d: int) -> torch.Tensor:
    """HF q, k, v rows of ``groups`` query groups -> megatron's [group][q heads, k, v] rows."""
    rest = q.shape[1:]
    q = q.reshape(groups, heads_per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def from_megarank(rule: Rule, full: torch.Tensor, model: Any) -> list[torch.Tensor]:
    """The full megarank tensor of ``rule`` -> its HF tensors (exact inverse of to_megarank)."""
    if rule.transform == "copy":
        return [full]
    if rule.transform == "vocab":
        return [full[: model.vocab_size]]
    if rule.transform == "gate_up":
        return list(full.chunk(2, dim=0))
    if rule.transform == "qkv":
        heads, groups, d = _qkv_geometry(model)
        rest = full.shape[1:]
        x = full.reshape(groups, (heads // groups + 2) * d, *rest)
        q, k, v = x.split([heads // groups * d, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    raise ValueError(f"unknown transform {rule.transform!r}")


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, rule: Rule, tp_rank: int,
             tp_size: int) -> torch.Tensor:
    """This TP rank's part of a full tensor, as megatron shards ``param``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if rule.transform == "gate_up":
        # megatron's fused fc1 shard is [gate shard; up shard], not a slice of [gate; up].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]])
    return full.chunk(tp_size, dim)[tp_rank]


def read_part(weights: HFWeights, rule: Rule, names: list[str], param: torch.nn.Parameter,
              tp_rank: int, tp_size: int, model: Any, padded_vocab: int) -> torch.Tensor:
    """This TP rank's part of ``rule``'s megarank tensor, reading only the HF slices it is made
    of: equal to ``tp_slice(to_megarank(full tensors))``, without reading the full tensors."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False) or weights.in_memory:
        full = to_megarank(rule, [weights.get(n) for n in names], model, padded_vocab)
        return tp_slice(full, param, rule, tp_rank, tp_size)
    dim = param.partition_dim

    def rank_range(size: int) -> tuple[int, int]:
        step = size // tp_size
        return tp_rank * step, (tp_rank + 1) * step

    if rule.transform == "copy":
        return weights.get_part(names[0], dim, *rank_range(weights.shape(names[0])[dim]))
    if rule.transform == "vocab":
        rows = weights.shape(names[0])[0]
        if rows > padded_vocab:
            raise ConversionError(f"{rule.hf[0]} has {rows} rows, more than the padded "
                                  f"vocabulary ({padded_vocab})")
        lo, hi = rank_range(padded_vocab)
        part = weights.get_part(names[0], 0, min(lo, rows), min(hi, rows))
        return torch.cat([part, part.new_zeros(hi - lo - part.shape[0], *part.shape[1:])])
    if rule.transform == "gate_up":
        # megatron's fc1 shard is [this rank's gate rows; this rank's up rows].
        return torch.cat([weights.get_part(n, 0, *rank_range(weights.shape(n)[0]))
                          for n in names])
    if rule.transform == "qkv":
        # A TP rank holds whole query groups: its q heads and their k and v, contiguous in each.
        heads, groups, d = _qkv_geometry(model)
        local, per_group = groups // tp_size, heads // groups
        lo = tp_rank * local
        q = weights.get_part(names[0], 0, lo * per_group * d, (lo + local) * per_group * d)
        k, v = (weights.get_part(n, 0, lo * d, (lo + local) * d) for n in names[1:])
        return _interleave_qkv(q, k, v, local, per_group, d)
    raise ValueError(f"unknown transform {rule.transform!r}")


# --------------------------------------------------------------------------------------------
# Name matching
# --------------------------------------------------------------------------------------------


@functools.cache
def _compile(rules: tuple[Rule, ...]) -> list[tuple[re.Pattern, Rule]]:
    return [(re.compile("^" + re.escape(r.ours).replace(r"\{i\}", r"(\d+)") + "$"), r)
            for r in rules]


def match(name: str, rules: tuple[Rule, ...]) -> tuple[Rule, int | None] | None:
    """The rule of ``rules`` for a (global) megarank parameter name, and its layer index."""
    for pattern, rule in _compile(rules):
        m = pattern.match(name)
        if m:
            return rule, int(m.group(1)) if m.groups() else None
    return None


_LAYER = re.compile(r"^(backbone\.(?:decoder|encoder)\.layers\.)(\d+)\.")


def global_name(local: str, layer_offset: int) -> str:
    """A stage-local parameter name with its layer index made global (pipeline parallelism)."""
    return _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + layer_offset}.", local)


def hf_names(rule: Rule, layer: int | None) -> list[str]:
    """The HF tensor names of ``rule`` for one layer."""
    return [n.format(i=layer) for n in rule.hf]


# --------------------------------------------------------------------------------------------
# Loading into a (sharded) model, and exporting a full one
# --------------------------------------------------------------------------------------------


def load_hf_weights(module: torch.nn.Module, hf_dir: str | Path, cfg: Any, tp_rank: int,
                    tp_size: int, pp_rank: int, pp_size: int, padded_vocab: int,
                    weights: HFWeights | None = None) -> list[str]:
    """Fill this rank's parameters from the HF model in ``hf_dir``, reading only their slices.

    Returns the names of parameters the HF files do not hold (e.g. a classifier on a BertModel
    checkpoint), which keep their initialisation. A backbone parameter without HF weights, or a
    shape that disagrees with the config, is an error. ``weights``: an ``HFWeights`` of
    ``hf_dir`` to read through (its ``bytes_read`` then tells how much this rank read).
    """
    weights = weights if weights is not None else HFWeights(hf_dir)
    rules = rules_for(cfg.model)
    offset = pp_rank * (cfg.model.num_layers // pp_size)
    missing: list[str] = []
    for local, param in module.named_parameters():
        name = global_name(local, offset)
        found = match(name, rules)
        if found is None:
            raise ConversionError(f"no HF mapping for parameter {name} "
                                  f"(model_type {cfg.model.hf_model_type or cfg.model.family})")
        rule, layer = found
        names = hf_names(rule, layer)
        if rule.ours == "head.output_weight" and names[0] not in weights:
            names = ["model.embed_tokens.weight"]  # tied embeddings: the LM head is the embedding
        absent = [n for n in names if n not in weights]
        if absent:
            if name.startswith("head."):
                missing.append(name)
                continue
            raise ConversionError(f"{hf_dir}: missing {absent[0]} (for {name})")
        part = read_part(weights, rule, names, param, tp_rank, tp_size, cfg.model, padded_vocab)
        if part.shape != param.shape:
            raise ConversionError(
                f"{hf_dir}: {', '.join(names)} gives {name} shape {tuple(part.shape)} on this "
                f"rank, but the model config expects {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(part)
    return missing


def iter_hf_tensors(items: Iterable[tuple[str, torch.Tensor]],
                    cfg: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a full single-process megarank model's (name, tensor) pairs."""
    rules = rules_for(cfg.model)
    for name, full in items:
        found = match(name, rules)
        if found is None:
            raise ConversionError(f"no HF mapping for parameter {name} "
                                  f"(model_type {cfg.model.hf_model_type or cfg.model.family})")
        rule, layer = found
        yield from zip(hf_names(rule, layer), from_megarank(rule, full, cfg.model), strict=True)
