"""Build the cross-encoder stage for this rank from the config: TransformerConfig, spec, head."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megarank.config import ENCODER_FAMILIES, padded_vocab_size
from megarank.models import embedding_grad
from megarank.models.cross_encoder import CrossEncoder
from megarank.models.deberta import DebertaBackbone
from megarank.models.decoder import DecoderBackbone, Llama3RopeScaling
from megarank.models.encoder import BertBackbone
from megarank.models.heads import ClassifierHead, YesNoHead
from megarank.models.pooling import make_pooled, pooling_supported
from megarank.models.specs import (
    KernelChoice,
    bert_layer_spec,
    deberta_layer_spec,
    gpt_layer_spec,
)
from megarank.parallel.megatron import DTYPES, fusion_settings

logger = logging.getLogger("megarank")


def transformer_config(cfg, device: torch.device, kernels: str = "local") -> TransformerConfig:
    """megatron TransformerConfig from the model, parallel and trainer groups."""
    m, p, trainer = cfg.model, cfg.parallel, cfg.trainer
    recompute = {} if trainer.recompute == "none" else {"recompute_granularity": trainer.recompute}
    if trainer.recompute == "full":
        recompute.update(recompute_method="uniform", recompute_num_layers=1)
    dtype = DTYPES[trainer.precision]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.head_dim or m.hidden_size // m.num_attention_heads,
        hidden_dropout=m.hidden_dropout or 0.0,  # None: no HF config set one
        attention_dropout=m.attention_dropout or 0.0,
        layernorm_epsilon=m.layernorm_epsilon,
        normalization=m.normalization,
        gated_linear_unit=m.gated_linear_unit,
        activation_func=F.silu if m.activation == "silu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias or m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=trainer.precision == "bf16",
        fp16=trainer.precision == "fp16",
        # Always initialise, even when an HF import overwrites the weights: megatron sets the
        # tensor-parallel attributes of its parameters (which grad-norm and the TP slicing of the
        # import rely on) only while initialising them.
        perform_initialization=True,
        # Dynamic padding per micro-batch: pipeline p2p sends shapes first.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # no MoE here; "allgather" rejects variable lengths
        # Fusions where their kernels exist; CPU weight initialisation off the GPU.
        **fusion_settings(device, kernels, m),
        **recompute,
    )


def build_cross_encoder(cfg, tconfig: TransformerConfig, kernels: KernelChoice,
                        pre_process: bool, post_process: bool,
                        answer_ids: tuple[int, int] | None = None) -> CrossEncoder:
    """This pipeline stage of the cross-encoder (embeddings on the first, head on the last).

    ``answer_ids``: the (yes, no) token ids for ``pair.head=yes_no``.
    """
    m = cfg.model
    vocab = padded_vocab_size(m)
    if m.family == "bert":
        backbone = BertBackbone(
            tconfig, bert_layer_spec(kernels.name), vocab, m.max_position_embeddings,
            m.type_vocab_size, pre_process, post_process, m.position_offset,
        )
    elif m.family == "deberta":
        backbone = DebertaBackbone(
            tconfig, functools.partial(deberta_layer_spec, pos_att_type=tuple(m.pos_att_type),
                                       share_att_key=m.share_att_key),
            vocab, m.max_position_embeddings if m.position_biased_input else 0,
            m.type_vocab_size, pre_process, post_process,
            dict(position_buckets=m.position_buckets,
                 max_relative_positions=m.max_relative_positions,
                 max_position_embeddings=m.max_position_embeddings,
                 norm_rel_ebd=m.norm_rel_ebd),
        )
    else:
        scaling = None
        if m.rope_scaling == "llama3":
            scaling = Llama3RopeScaling(m.rope_scaling_factor, m.rope_low_freq_factor,
                                        m.rope_high_freq_factor,
                                        m.rope_original_max_position_embeddings)
        backbone = DecoderBackbone(
            tconfig, gpt_layer_spec(m.normalization, m.qk_layernorm, kernels.name), vocab,
            m.max_position_embeddings, m.rotary_base, pre_process, post_process, scaling,
        )
    yes_no = cfg.pair.head == "yes_no"
    tied = yes_no and m.tie_word_embeddings  # the yes/no output layer is the embedding table
    if pre_process and not tied:
        embedding_grad.install(backbone)
    head = None
    if post_process and yes_no:
        table = backbone.embedding.word_embeddings if (tied and pre_process) else None
        head = YesNoHead(tconfig, vocab, *answer_ids, tied_embedding=table)
    elif post_process:
        encoder = m.family in ENCODER_FAMILIES
        head = ClassifierHead(tconfig, with_pooler=encoder, layout=m.encoder_head,
                              dropout=m.classifier_dropout, pooler_dropout=m.pooler_dropout)
    return CrossEncoder(tconfig, backbone, head, tied=tied,
                        pooled_layer=pooled_last_layer(cfg, tconfig, backbone, post_process))


def pooled_last_layer(cfg, tconfig: TransformerConfig, backbone,
                      post_process: bool) -> torch.nn.Module | None:
    """The last stage's last layer when it is to compute the pooled rows only
    (``trainer.pooled_last_layer``, megarank.models.pooling), else None (and why, logged)."""
    if not (post_process and cfg.trainer.pooled_last_layer):
        return None
    block = getattr(backbone, "encoder", None) or getattr(backbone, "decoder", None)
    if block is None or len(block.layers) == 0:
        return None
    layer = block.layers[-1]
    why = pooling_supported(layer, tconfig)
    if why is not None:
        logger.info(f"trainer.pooled_last_layer: the last layer computes every row ({why})")
        return None
    return make_pooled(layer)


def sync_tied_output_layer(model: CrossEncoder) -> None:
    """Make the last stage's copy of a tied LM output layer equal the first stage's embedding.

    Only with pipeline parallelism and tied embeddings (yes/no head); megatron's GPTModel does the
    same at start-up. Afterwards finalize_model_grads keeps the two copies in step.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not model.share_embeddings_and_output_weights:
        return
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    weight = model.shared_embedding_or_output_weight()
    if weight is None:
        return
    if not model.pre_process:
        weight.data.zero_()
    dist.all_reduce(weight.data, group=ps.get_embedding_group())


def sync_pipeline_shared(model: CrossEncoder) -> None:
    """Make every pipeline stage's copy of a ``pipeline_shared`` parameter (DeBERTa's
    relative-position table) equal the first stage's; afterwards megarank.parallel.megatron.
    finalize_grads sums their gradients, so the copies stay in step."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    src = ps.get_pipeline_model_parallel_first_rank()
    group = ps.get_pipeline_model_parallel_group()
    for p in model.parameters():
        if getattr(p, "pipeline_shared", False):
            dist.broadcast(p.data, src=src, group=group)
