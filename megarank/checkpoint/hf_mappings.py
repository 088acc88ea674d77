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

Both megatron naming schemes are in the tables: with the local layer spec a decoder's pre-norms
are ``input_layernorm`` / ``pre_mlp_layernorm``; with Transformer Engine's spec they are fused into
the following linear as ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
(megatron checkpoints always use the local names: ``megarank.models.specs.TE_FUSED_NORMS``).
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


def _encoder_body(base: str) -> tuple[Rule, ...]:
    """Embeddings and post-LN layers of a BERT-architecture encoder under ``base`` (``bert`` or
    ``roberta``): BERT, RoBERTa and XLM-RoBERTa name them alike."""
    hl = f"{base}.encoder.layer.{{i}}"
    return (
        Rule("backbone.embeddings.word_embeddings.weight",
             (f"{base}.embeddings.word_embeddings.weight",), "vocab"),
        Rule("backbone.embeddings.position_embeddings.weight",
             (f"{base}.embeddings.position_embeddings.weight",)),
        Rule("backbone.embeddings.token_type_embeddings.weight",
             (f"{base}.embeddings.token_type_embeddings.weight",)),
        Rule("backbone.embeddings.layernorm.weight", (f"{base}.embeddings.LayerNorm.weight",)),
        Rule("backbone.embeddings.layernorm.bias", (f"{base}.embeddings.LayerNorm.bias",)),
        *(
            Rule(f"{_BL}.self_attention.linear_qkv.{p}",
                 tuple(f"{hl}.attention.self.{n}.{p}" for n in ("query", "key", "value")), "qkv")
            for p in ("weight", "bias")
        ),
        *(Rule(f"{_BL}.self_attention.linear_proj.{p}", (f"{hl}.attention.output.dense.{p}",))
          for p in ("weight", "bias")),
        *(Rule(f"{_BL}.post_attention_layernorm.{p}", (f"{hl}.attention.output.LayerNorm.{p}",))
          for p in ("weight", "bias")),
        *(Rule(f"{_BL}.mlp.linear_fc1.{p}", (f"{hl}.intermediate.dense.{p}",))
          for p in ("weight", "bias")),
        *(Rule(f"{_BL}.mlp.linear_fc2.{p}", (f"{hl}.output.dense.{p}",))
          for p in ("weight", "bias")),
        *(Rule(f"{_BL}.post_mlp_layernorm.{p}", (f"{hl}.output.LayerNorm.{p}",))
          for p in ("weight", "bias")),
    )


# BertForSequenceClassification: BertPooler (dense + tanh on [CLS]) -> dropout -> classifier.
BERT: tuple[Rule, ...] = (
    *_encoder_body("bert"),
    Rule("head.pooler.weight", ("bert.pooler.dense.weight",)),
    Rule("head.pooler.bias", ("bert.pooler.dense.bias",)),
    Rule("head.score.weight", ("classifier.weight",)),
    Rule("head.score.bias", ("classifier.bias",)),
)

# (XLM-)RobertaForSequenceClassification: RobertaClassificationHead, dense -> tanh -> out_proj on
# <s>. (RobertaModel's own pooler, in base checkpoints, is not part of the classifier.)
ROBERTA: tuple[Rule, ...] = (
    *_encoder_body("roberta"),
    Rule("head.pooler.weight", ("classifier.dense.weight",)),
    Rule("head.pooler.bias", ("classifier.dense.bias",)),
    Rule("head.score.weight", ("classifier.out_proj.weight",)),
    Rule("head.score.bias", ("classifier.out_proj.bias",)),
)

_DH = "deberta.encoder.layer.{i}"

# DebertaV2ForSequenceClassification: DebertaV2Model, ContextPooler (dense + GELU on [CLS]),
# classifier. The relative-position table and its LayerNorm sit in DebertaV2Encoder; absolute
# positions (position_biased_input) and token types (type_vocab_size > 0) exist only in some
# configs, and their rules then apply.
DEBERTA: tuple[Rule, ...] = (
    Rule("backbone.embeddings.word_embeddings.weight",
         ("deberta.embeddings.word_embeddings.weight",), "vocab"),
    Rule("backbone.embeddings.position_embeddings.weight",
         ("deberta.embeddings.position_embeddings.weight",)),
    Rule("backbone.embeddings.token_type_embeddings.weight",
         ("deberta.embeddings.token_type_embeddings.weight",)),
    *(Rule(f"backbone.embeddings.layernorm.{p}", (f"deberta.embeddings.LayerNorm.{p}",))
      for p in ("weight", "bias")),
    Rule("backbone.relative.embeddings.weight", ("deberta.encoder.rel_embeddings.weight",)),
    *(Rule(f"backbone.relative.layernorm.{p}", (f"deberta.encoder.LayerNorm.{p}",))
      for p in ("weight", "bias")),
    *(
        Rule(f"{_BL}.self_attention.linear_qkv.{p}",
             tuple(f"{_DH}.attention.self.{n}_proj.{p}" for n in ("query", "key", "value")),
             "qkv")
        for p in ("weight", "bias")
    ),
    # share_att_key false: position projections of their own, head rows as the query's.
    *(Rule(f"{_BL}.self_attention.{n}.{p}", (f"{_DH}.attention.self.{n}.{p}",))
      for n in ("pos_key_proj", "pos_query_proj") for p in ("weight", "bias")),
    *(Rule(f"{_BL}.self_attention.linear_proj.{p}", (f"{_DH}.attention.output.dense.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.post_attention_layernorm.{p}", (f"{_DH}.attention.output.LayerNorm.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.mlp.linear_fc1.{p}", (f"{_DH}.intermediate.dense.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.mlp.linear_fc2.{p}", (f"{_DH}.output.dense.{p}",))
      for p in ("weight", "bias")),
    *(Rule(f"{_BL}.post_mlp_layernorm.{p}", (f"{_DH}.output.LayerNorm.{p}",))
      for p in ("weight", "bias")),
    Rule("head.pooler.weight", ("pooler.dense.weight",)),
    Rule("head.pooler.bias", ("pooler.dense.bias",)),
    Rule("head.score.weight", ("classifier.weight",)),
    Rule("head.score.bias", ("classifier.bias",)),
)

_DL = "backbone.decoder.layers.{i}"
_LL = "model.layers.{i}"

# Llama, Mistral, Qwen2 (QKV bias) and Qwen3 (q/k norm) share one table.
DECODER: tuple[Rule, ...] = (
    Rule("backbone.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule(f"{_DL}.input_layernorm.weight", (f"{_LL}.input_layernorm.weight",)),
    # Transformer Engine spec: the same norm, fused into the QKV projection.
    Rule(f"{_DL}.self_attention.linear_qkv.layer_norm_weight", (f"{_LL}.input_layernorm.weight",)),
    *(
        Rule(f"{_DL}.self_attention.linear_qkv.{p}",
             tuple(f"{_LL}.self_attn.{n}_proj.{p}" for n in ("q", "k", "v")), "qkv")
        for p in ("weight", "bias")
    ),
    Rule(f"{_DL}.self_attention.q_layernorm.weight", (f"{_LL}.self_attn.q_norm.weight",)),
    Rule(f"{_DL}.self_attention.k_layernorm.weight", (f"{_LL}.self_attn.k_norm.weight",)),
    Rule(f"{_DL}.self_attention.linear_proj.weight", (f"{_LL}.self_attn.o_proj.weight",)),
    Rule(f"{_DL}.pre_mlp_layernorm.weight", (f"{_LL}.post_attention_layernorm.weight",)),
    # Transformer Engine spec: the same norm, fused into fc1.
    Rule(f"{_DL}.mlp.linear_fc1.layer_norm_weight", (f"{_LL}.post_attention_layernorm.weight",)),
    Rule(f"{_DL}.mlp.linear_fc1.weight",
         (f"{_LL}.mlp.gate_proj.weight", f"{_LL}.mlp.up_proj.weight"), "gate_up"),
    Rule(f"{_DL}.mlp.linear_fc2.weight", (f"{_LL}.mlp.down_proj.weight",)),
    Rule("backbone.decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("head.score.weight", ("score.weight",)),
    # yes/no head: the LM output layer (absent from HF files whose embeddings are tied).
    Rule("head.output_weight", ("lm_head.weight",), "vocab"),
)

# The name table of each HF model_type.
RULES: dict[str, tuple[Rule, ...]] = {
    "bert": BERT, "roberta": ROBERTA, "xlm-roberta": ROBERTA, "deberta-v2": DEBERTA,
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER,
}
# A backbone built without an HF model_type (a fresh config) uses its family's table.
FAMILY_RULES: dict[str, tuple[Rule, ...]] = {"bert": BERT, "deberta": DEBERTA, "gpt": DECODER}

# The base-model prefix of each encoder table: BertModel / XLMRobertaModel checkpoints (e.g.
# sentence-transformers') store their tensors without it.
BASE_PREFIXES = ("bert.", "roberta.", "deberta.")

# HF architectures megarank writes, per model_type and head.
EXPORT_ARCHITECTURES = {
    ("bert", "classifier"): "BertForSequenceClassification",
    ("roberta", "classifier"): "RobertaForSequenceClassification",
    ("xlm-roberta", "classifier"): "XLMRobertaForSequenceClassification",
    ("deberta-v2", "classifier"): "DebertaV2ForSequenceClassification",
    ("llama", "classifier"): "LlamaForSequenceClassification",
    ("mistral", "classifier"): "MistralForSequenceClassification",
    ("qwen2", "classifier"): "Qwen2ForSequenceClassification",
    ("qwen3", "classifier"): "Qwen3ForSequenceClassification",
    ("llama", "yes_no"): "LlamaForCausalLM",
    ("mistral", "yes_no"): "MistralForCausalLM",
    ("qwen2", "yes_no"): "Qwen2ForCausalLM",
    ("qwen3", "yes_no"): "Qwen3ForCausalLM",
}


def rules_for(model_cfg) -> tuple[Rule, ...]:
    """The name table of a model config: by its HF model_type, else by its family."""
    mt = model_cfg.hf_model_type
    return RULES[mt] if mt in RULES else FAMILY_RULES[model_cfg.family]
