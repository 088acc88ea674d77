"""Rerank heads: pool one hidden state per (query, document) pair and project it to a score."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def pool(hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """hidden [s, b, h], pool_index [b] -> [b, h]: the hidden state at each row's pooling position.

    Decoders pool the last non-padding token (it has seen the whole pair), encoders [CLS] (index 0).
    """
    return hidden[pool_index, torch.arange(hidden.shape[1], device=hidden.device)]


class ClassifierHead(MegatronModule):
    """Score = Linear(pooled) with one output, as HF ``*ForSequenceClassification(num_labels=1)``.

    Encoders first run BERT's pooler (dense + tanh on [CLS]) and dropout, as HF BERT does; decoder
    classifiers (Llama/Qwen ``score``) have no pooler and no bias.
    """

    def __init__(self, config: TransformerConfig, with_pooler: bool) -> None:
        super().__init__(config=config)
        h = config.hidden_size
        self.pooler = torch.nn.Linear(h, h) if with_pooler else None
        self.dropout = torch.nn.Dropout(config.hidden_dropout)
        self.score = torch.nn.Linear(h, 1, bias=with_pooler)
        if config.perform_initialization:
            for lin in (self.pooler, self.score):
                if lin is not None:
                    config.init_method(lin.weight)
                    if lin.bias is not None:
                        torch.nn.init.zeros_(lin.bias)

    def forward(self, hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] (full sequence on every TP rank) -> scores [b]."""
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        x = pool(hidden, pool_index)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.score(self.dropout(x)).squeeze(-1)
