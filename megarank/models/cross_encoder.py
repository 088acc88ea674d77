"""The cross-encoder: a backbone stage plus, on the last pipeline stage, the rerank head."""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megarank.models.pooling import PooledRows, set_pooled


class CrossEncoder(MegatronModule):
    """Scores (query, document) pairs: one logit per row of the batch."""

    def __init__(self, config: TransformerConfig, backbone: MegatronModule,
                 head: MegatronModule | None, tied: bool = False,
                 pooled_layer: torch.nn.Module | None = None) -> None:
        super().__init__(config=config)
        self.backbone = backbone
        self.head = head  # only on the last pipeline stage
        # The stage's last layer, run for the head's pooled rows only (megarank.models.pooling);
        # in a list, so that it is not registered a second time as a submodule.
        self._pooled_layer = [pooled_layer] if pooled_layer is not None else []
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask for
        # finalize_model_grads all-reduces the embedding / LM-output-layer grads between the first
        # and last pipeline stages when they are one tied weight held twice (yes/no head, PP > 1).
        self.share_embeddings_and_output_weights = tied
        self.pre_process = backbone.pre_process
        self.post_process = backbone.post_process

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The tied weight this stage holds (megatron's hook for the embedding-group all-reduce)."""
        if self.pre_process:
            return self.backbone.embedding.word_embeddings.weight
        if self.head is not None and getattr(self.head, "output_weight", None) is not None:
            return self.head.output_weight
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        """As MegatronModule's, with a tied LM output layer saved as a copy of the embedding, and
        Transformer Engine's fused-norm parameters under the local spec's names (checkpoints
        move between kernels)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        from megarank.models.specs import canonical_name

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for value in sd.values():
            if isinstance(value, ShardedTensor):
                value.key = canonical_name(value.key)
        key = f"{prefix}head.output_weight"
        if self.share_embeddings_and_output_weights and key in sd and not self.pre_process:
            from megatron.core import parallel_state as ps
            from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

            sd[key] = make_tp_sharded_tensor_for_checkpoint(
                tensor=self.head.output_weight,
                key=f"{prefix}backbone.embedding.word_embeddings.weight",
                replica_id=(1, 0, ps.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True,
            )
        return sd

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Called by megatron's pipeline schedules on every stage but the first."""
        self.backbone.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor, pool_index: torch.Tensor,
                packed=None) -> torch.Tensor:
        """[b, s] inputs -> scores [b] on the last stage, hidden states [s, b, h] elsewhere.

        ``packed`` (megarank.data.packing.PackedPairs): the inputs are one row [1, T] of pairs
        laid end to end and ``pool_index`` holds each pair's pooled position in it; the scores
        are then one per pair. With a pooled last layer the backbone's output is the pooled
        rows only, [1, n, h], and the head reads row 0 of each column.
        """
        rows = None
        if self._pooled_layer:
            rows = PooledRows(pool_index)
            set_pooled(self._pooled_layer[0], rows)
        if packed is None:
            hidden = self.backbone(input_ids, attention_mask, token_type_ids)
        else:
            hidden = self.backbone(input_ids, attention_mask, token_type_ids, packed=packed)
        if self.head is None:
            return hidden
        return self.head(hidden, pool_index if rows is None else rows.head_index())
