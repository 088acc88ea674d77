"""Hugging Face <-> megarank weight names, written as data.

Each rule maps one megarank (megatron local-spec) parameter to the HF tensors it is made of, and
names the transform between them (``transforms`` in ``hf.py``):

- ``copy``: the same tensor;
- ``vocab``: embedding rows, padded with zeros to the TP-aligned vocabulary (trimmed on export);
- ``qkv``: HF's separate q/k/v projections <-> megatron's fused QKV, interleaved per query group
  as ``[group][q heads of the group, k, v]`` (so a contiguous TP shard holds whole groups);
- ``gate_up``: HF's gate_proj and up_proj <-> megatron's fused fc1 ``[gate; up]``.

``{i}`` is the global layer index. Rules whose megarank parameter a model does not have (a QKV bias
on Llama, q/k norms before Qwen3, a pooler on decoders) simply do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One megarank parameter and the HF tensors it is converted from / to."""

    ours: str
    hf: tuple[str, ...]
    transform: str = "copy"


_BL = "backbone.encoder.layers.{i}"
_HL = "bert.encoder.layer.{i}"

BERT: tuple[Rule, ...] = (
    Rule("backbone.embeddings.word_embeddings.weight", ("bert.embeddings.word_embeddings.weight",),
         "vocab"),
    Rule("backbone.embeddings.position_embeddings.weight",
         ("bert.embeddings.position_embeddings.weight",)),
    Rule("backbone.embeddings.token_type_embeddings.weight",
         ("bert.embeddings.token_type_embeddings.weight",)),
    Rule("backbone.embeddings.layernorm.weight", ("bert.embeddings.LayerNorm.weight",)),
    Rule("backbone.embeddings.layernorm.bias", ("bert.embeddings.LayerNorm.bias",)),
    *(
        Rule(f"{_BL}.self_attention.linear_qkv.{p}",
             tuple(f"{_HL}.attention.self.{n}.{p}" for n in ("query", "key", "value")), "qkv")
        for p in ("weight", "bias")
    ),
    *(Rule(f"{_BL}.self_attention.linear_proj.{p}", (f"{_HL}.attention.output.dense.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.post_attention_layernorm.{p}", (f"{_HL}.attention.output.LayerNorm.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.mlp.linear_fc1.{p}", (f"{_HL}.intermediate.dense.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.mlp.linear_fc2.{p}", (f"{_HL}.output.dense.{p}",)) for p in ("weight", "bias")),
    *(Rule(f"{_BL}.post_mlp_layernorm.{p}", (f"{_HL}.output.LayerNorm.{p}",))
      for p in ("weight", "bias")),
    Rule("head.pooler.weight", ("bert.pooler.dense.weight",)),
    Rule("head.pooler.bias", ("bert.pooler.dense.bias",)),
    Rule("head.score.weight", ("classifier.weight",)),
    Rule("head.score.bias", ("classifier.bias",)),
)

_DL = "backbone.decoder.layers.{i}"
_LL = "model.layers.{i}"

# Llama, Qwen2 (QKV bias) and Qwen3 (q/k norm) share one table.
DECODER: tuple[Rule, ...] = (
    Rule("backbone.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule(f"{_DL}.input_layernorm.weight", (f"{_LL}.input_layernorm.weight",)),
    *(
        Rule(f"{_DL}.self_attention.linear_qkv.{p}",
             tuple(f"{_LL}.self_attn.{n}_proj.{p}" for n in ("q", "k", "v")), "qkv")
        for p in ("weight", "bias")
    ),
    Rule(f"{_DL}.self_attention.q_layernorm.weight", (f"{_LL}.self_attn.q_norm.weight",)),
    Rule(f"{_DL}.self_attention.k_layernorm.weight", (f"{_LL}.self_attn.k_norm.weight",)),
    Rule(f"{_DL}.self_attention.linear_proj.weight", (f"{_LL}.self_attn.o_proj.weight",)),
    Rule(f"{_DL}.pre_mlp_layernorm.weight", (f"{_LL}.post_attention_layernorm.weight",)),
    Rule(f"{_DL}.mlp.linear_fc1.weight",
         (f"{_LL}.mlp.gate_proj.weight", f"{_LL}.mlp.up_proj.weight"), "gate_up"),
    Rule(f"{_DL}.mlp.linear_fc2.weight", (f"{_LL}.mlp.down_proj.weight",)),
    Rule("backbone.decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("head.score.weight", ("score.weight",)),
    # yes/no head: the LM output layer (absent from HF files whose embeddings are tied).
    Rule("head.output_weight", ("lm_head.weight",), "vocab"),
)

RULES: dict[str, tuple[Rule, ...]] = {"bert": BERT, "gpt": DECODER}

# HF architectures megarank writes, per family and head.
EXPORT_ARCHITECTURES = {
    ("bert", "classifier"): "BertForSequenceClassification",
    ("llama", "classifier"): "LlamaForSequenceClassification",
    ("qwen2", "classifier"): "Qwen2ForSequenceClassification",
    ("qwen3", "classifier"): "Qwen3ForSequenceClassification",
    ("llama", "yes_no"): "LlamaForCausalLM",
    ("qwen2", "yes_no"): "Qwen2ForCausalLM",
    ("qwen3", "yes_no"): "Qwen3ForCausalLM",
}
