"""The cross-encoder: a backbone stage plus, on the last pipeline stage, the rerank head."""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class CrossEncoder(MegatronModule):
    """Scores (query, document) pairs: one logit per row of the batch."""

    def __init__(self, config: TransformerConfig, backbone: MegatronModule,
                 head: MegatronModule | None) -> None:
        super().__init__(config=config)
        self.backbone = backbone
        self.head = head  # only on the last pipeline stage
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask for
        # No LM output layer tied to the input embedding: nothing for finalize_model_grads to
        # all-reduce between the first and last pipeline stages.
        self.share_embeddings_and_output_weights = False
        self.pre_process = backbone.pre_process
        self.post_process = backbone.post_process

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Called by megatron's pipeline schedules on every stage but the first."""
        self.backbone.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """[b, s] inputs -> scores [b] on the last stage, hidden states [s, b, h] elsewhere."""
        hidden = self.backbone(input_ids, attention_mask, token_type_ids)
        if self.head is None:
            return hidden
        return self.head(hidden, pool_index)
