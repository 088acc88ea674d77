"""DeBERTa-v2/v3 on megatron-core: disentangled attention over log-bucketed relative positions,
reproducing Hugging Face ``DebertaV2Model`` (and ``DebertaV2ForSequenceClassification`` with
``heads.ClassifierHead(layout="deberta")``).

A DeBERTa layer is BERT's post-LN layer with another attention score. Besides content to content
(q_i . k_j), each query reads the relative position of each key (c2p: q_i . Pk[d(i, j)]) and each
key the relative position of each query (p2c: k_j . Pq[d(i, j)]), where P is one table of
2 * span relative-position embeddings shared by all layers (LayerNorm'ed when ``norm_rel_ebd`` is
``layer_norm``) projected through each layer's own query and key weights (``share_att_key``, as
v3) or its own position projections (``share_att_key`` false), and
d(i, j) the bucket of i - j shifted into [0, 2 * span). The scores are divided by
sqrt(head_dim * (1 + number of position terms)). v3 adds no absolute positions to the input.

Each layer reads the shared table itself (it is small: 2 * 256 rows for v3), so a layer stays a
function of its hidden states alone: full recompute and pipeline stages need nothing threaded
through megatron's TransformerBlock. Every pipeline stage holds the table; ``pipeline_shared``
marks it, so its gradients are summed over the stages (megarank.parallel.megatron) and its copies
stay equal.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megarank.models.attention import attend
from megarank.models.encoder import BertBackbone
from megarank.models.norms import layer_norm_class


def log_buckets(rel: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Relative distances (long) -> DeBERTa's buckets: exact within +-buckets/2, logarithmic
    beyond, reaching +-(buckets - 1) at max_position. Float32 as transformers computes it, so
    every ceil lands on the same integer."""
    mid = buckets // 2
    sign = torch.sign(rel)
    near = (rel < mid) & (rel > -mid)
    dist = torch.where(near, torch.full_like(rel, mid - 1), rel.abs())
    ratio = torch.log(dist / mid) / torch.log(torch.tensor((max_position - 1) / mid))
    far = torch.ceil(ratio * (mid - 1)) + mid
    return torch.where(dist <= mid, rel.to(far.dtype), far * sign).long()


class RelativePositions(MegatronModule):
    """The relative-position embeddings every layer shares, their LayerNorm, and the bucketing.

    ``span`` is ``position_buckets`` when positive, else ``max_relative_positions`` (which falls
    back to max_position_embeddings when < 1); the table has 2 * span rows.
    """

    def __init__(self, config: TransformerConfig, position_buckets: int,
                 max_relative_positions: int, max_position_embeddings: int,
                 norm_rel_ebd: str) -> None:
        super().__init__(config=config)
        self.max_position = (max_relative_positions if max_relative_positions >= 1
                             else max_position_embeddings)
        self.buckets = position_buckets
        self.span = position_buckets if position_buckets > 0 else self.max_position
        self.embeddings = torch.nn.Embedding(2 * self.span, config.hidden_size)
        if config.perform_initialization:
            config.init_method(self.embeddings.weight)
        self.layernorm = None
        if norm_rel_ebd == "layer_norm":
            self.layernorm = layer_norm_class(config.normalization)(
                config, config.hidden_size, config.layernorm_epsilon)
        for p in self.parameters():
            p.pipeline_shared = True  # one table, a copy on every pipeline stage

    def table(self) -> torch.Tensor:
        """The (normalised) embeddings, [2 * span, h]."""
        w = self.embeddings.weight
        return self.layernorm(w) if self.layernorm is not None else w

    def index(self, s: int, device: torch.device) -> torch.Tensor:
        """[s, s] row of the table that query i reads for key j (c2p), clamped to the table.

        The buckets are odd in i - j, so p2c's index of (i, j), built by transformers from
        j - i negated, is the same tensor."""
        pos = torch.arange(s, device=device)
        rel = pos[:, None] - pos[None, :]
        if self.buckets > 0 and self.max_position > 0:
            rel = log_buckets(rel, self.buckets, self.max_position)
        return (rel + self.span).clamp(0, 2 * self.span - 1)


class DisentangledAttention(MegatronModule):
    """Core attention with DeBERTa's content-position terms (``core_attention`` of the spec).

    Same inputs as megatron's core attention plus this rank's heads of the projected position
    table: ``pos_key`` (c2p) and ``pos_query`` (p2c), [2 * span, heads, d], either None when
    ``pos_att_type`` leaves its term out, and ``index`` [s, s] from RelativePositions.index.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_dropout: float | None = None,
                 **unused: object) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, pos_query: torch.Tensor | None,
                pos_key: torch.Tensor | None, index: torch.Tensor,
                packed_seq_params: object | None = None) -> torch.Tensor:
        """query/key/value [s, b, np, hn] -> context [s, b, np * hn]. ``attention_mask``: True
        where a key may NOT be attended, broadcastable to [b, 1, s, s]."""
        if packed_seq_params is not None:
            raise NotImplementedError("DeBERTa attention has no packed path (data.packing)")
        s, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        terms = 1 + (pos_key is not None) + (pos_query is not None)
        scale = 1.0 / math.sqrt(hn * terms)
        bias = q.new_zeros(())
        if pos_key is not None:  # c2p: query i . position key of d(i, j)
            c2p = torch.einsum("bhid,rhd->bhir", q, pos_key)  # [b, np, s, 2 span]
            bias = bias + c2p.gather(-1, index.expand(b, np_, s, s))
        if pos_query is not None:  # p2c: key j . position query of d(i, j)
            p2c = torch.einsum("bhjd,rhd->bhjr", k, pos_query)  # [b, np, s(keys), 2 span]
            bias = bias + p2c.gather(-1, index.t().expand(b, np_, s, s)).transpose(-1, -2)
        bias = (bias * scale).expand(b, np_, s, s)
        if attention_mask is not None:
            bias = bias.masked_fill(attention_mask, torch.finfo(bias.dtype).min)
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=bias, dropout_p=dropout_p, scale=scale)
        ctx = attend(q, k, v, tp_rng=not self.config.sequence_parallel, **kwargs)
        return ctx.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)


class DisentangledSelfAttention(SelfAttention):
    """megatron's SelfAttention that also projects the shared position table for
    :class:`DisentangledAttention`: through its fused QKV projection (``share_att_key``: position
    queries and keys use the content query and key weights, LoRA adapters included), or through
    position projections of its own, column-parallel like the query (HF ``pos_key_proj`` for
    c2p, ``pos_query_proj`` for p2c)."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.padding,
                 relative: RelativePositions | None = None,
                 pos_att_type: tuple[str, ...] = ("p2c", "c2p"), share_att_key: bool = True,
                 **kwargs) -> None:
        super().__init__(config, submodules, layer_number, attn_mask_type, **kwargs)
        self._relative = [relative]  # a list: the table is the backbone's parameter, not ours
        self.c2p, self.p2c = "c2p" in pos_att_type, "p2c" in pos_att_type
        self.share_att_key = share_att_key
        if not share_att_key:
            def projection() -> tensor_parallel.ColumnParallelLinear:
                return tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, self.query_projection_size, config=config,
                    init_method=config.init_method, bias=True, gather_output=False)

            self.pos_key_proj = projection() if self.c2p else None
            self.pos_query_proj = projection() if self.p2c else None

    def _position_heads(self, table: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The table [2 span, h] -> this rank's heads of its position queries and keys,
        [2 span, heads, d] each (None for a term pos_att_type leaves out)."""
        if self.share_att_key:
            # The table goes through this rank's QKV shard as a sequence of 2 * span tokens
            # (the column-parallel linear sums its input gradient over TP ranks).
            pos_q, pos_k, _ = self.get_query_key_value_tensors(table[:, None])
            return (pos_q[:, 0] if self.p2c else None), (pos_k[:, 0] if self.c2p else None)
        shape = (table.shape[0], self.num_attention_heads_per_partition,
                 self.hidden_size_per_attention_head)
        out = []
        for proj in (self.pos_query_proj, self.pos_key_proj):
            out.append(None if proj is None else proj(table[:, None])[0].view(shape))
        return tuple(out)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                packed_seq_params: object | None = None, **unused: object
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s, b, h] -> (output [s, b, h], bias of the output projection)."""
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        relative = self._relative[0]
        # HF drops the table out in every layer (hidden_dropout_prob); the table is replicated
        # over TP ranks, so the mask comes from the default generator, the same on each.
        table = relative.table()
        if self.training and self.config.hidden_dropout > 0:
            table = torch.nn.functional.dropout(table, self.config.hidden_dropout)
        pos_q, pos_k = self._position_heads(table)
        args = (query, key, value, attention_mask, pos_q, pos_k,
                relative.index(hidden_states.shape[0], hidden_states.device))
        if self.checkpoint_core_attention and self.training:
            # Selective recompute: the [s, s] scores and probabilities are made again in backward.
            ctx = tensor_parallel.checkpoint(self.core_attention, False, *args)
        else:
            ctx = self.core_attention(*args, packed_seq_params=packed_seq_params)
        return self.linear_proj(ctx)


class DebertaBackbone(BertBackbone):
    """DeBERTa-v2/v3: BERT's embeddings (absolute positions only with position_biased_input,
    token types only with type_vocab_size > 0) and post-LN layers with disentangled attention,
    plus the shared relative-position table on every stage."""

    def __init__(self, config: TransformerConfig, layer_spec_for, vocab_size: int,
                 max_positions: int, type_vocab_size: int, pre_process: bool,
                 post_process: bool, relative_args: dict) -> None:
        """``layer_spec_for(relative)``: the layer spec whose attention reads ``relative``."""
        relative = RelativePositions(config, **relative_args)
        spec: ModuleSpec = layer_spec_for(relative)
        super().__init__(config, spec, vocab_size, max_positions, type_vocab_size, pre_process,
                         post_process)
        self.relative = relative
        if not pre_process:
            # A copy of the first stage's table: megatron leaves `shared` parameters out of
            # the gradient norm, so the table counts once.
            for p in relative.parameters():
                p.shared = True

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        """As MegatronModule's, with the later stages' copies of the table saved as replicas
        of the first stage's (one main replica per checkpoint key)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.pre_process:
            from megatron.core import parallel_state as ps

            stage = ps.get_pipeline_model_parallel_rank()
            for key, value in sd.items():
                if key.startswith(f"{prefix}relative."):
                    value.replica_id = (stage, *value.replica_id[1:])
        return sd
