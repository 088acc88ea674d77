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

    Encoders first run a dense + tanh on the first token: BERT's pooler, then dropout
    (``bert``), or RobertaClassificationHead's dropout, dense, tanh, dropout (``roberta``), or
    DeBERTa's ContextPooler, dropout (``pooler_dropout``), dense, GELU, then dropout
    (``deberta``); decoder classifiers (Llama/Qwen ``score``) have no pooler and no bias.
    """

    def __init__(self, config: TransformerConfig, with_pooler: bool, layout: str = "bert",
                 dropout: float | None = None, pooler_dropout: float = 0.0) -> None:
        super().__init__(config=config)
        if layout not in ("bert", "roberta", "deberta"):
            raise ValueError(f"classifier layout must be bert, roberta or deberta, got {layout!r}")
        h = config.hidden_size
        self.pooler = torch.nn.Linear(h, h) if with_pooler else None
        self.activation = torch.nn.functional.gelu if layout == "deberta" else torch.tanh
        self.dropout = torch.nn.Dropout(config.hidden_dropout if dropout is None else dropout)
        self.dropout_first = None
        if with_pooler and layout == "roberta":
            self.dropout_first = self.dropout
        elif with_pooler and layout == "deberta":
            self.dropout_first = torch.nn.Dropout(pooler_dropout)
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
        if self.dropout_first is not None:
            x = self.dropout_first(x)
        if self.pooler is not None:
            x = self.activation(self.pooler(x))
        return self.score(self.dropout(x)).squeeze(-1)


class YesNoHead(MegatronModule):
    """score = logit("yes") - logit("no") at the pooled (last) token, as Qwen3-Reranker scores.

    Only the two rows of the (vocab-parallel) LM output layer are used: each TP rank computes the
    logits of the rows it owns and one all-reduce of a [b, 2] tensor sums them. The full [s, b, V]
    logits are never formed. With tied embeddings on a single stage the output layer IS the input
    embedding; otherwise the head holds its own vocab-parallel copy ``output_weight``.
    """

    def __init__(self, config: TransformerConfig, padded_vocab: int, yes_id: int, no_id: int,
                 tied_embedding: torch.nn.Module | None) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        rows = padded_vocab // tp
        self.vocab_start = rank * rows
        self.rows = rows
        # A plain list keeps the tied embedding out of this module's parameters (no duplicate).
        self._tied = [tied_embedding] if tied_embedding is not None else []
        if tied_embedding is None:
            self.output_weight = torch.nn.Parameter(
                torch.empty(rows, config.hidden_size, dtype=config.params_dtype))
            tensor_parallel.set_tensor_model_parallel_attributes(self.output_weight, True, 0, 1)
            if config.perform_initialization:
                config.init_method(self.output_weight)
        self.register_buffer("token_ids", torch.tensor([yes_id, no_id]), persistent=False)

    def weight(self) -> torch.Tensor:
        """This TP rank's rows of the LM output layer, [V/tp, h]."""
        return self._tied[0].weight if self._tied else self.output_weight

    def forward(self, hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] -> scores [b]."""
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        x = pool(hidden, pool_index)  # [b, h]
        local = self.token_ids - self.vocab_start
        owned = (local >= 0) & (local < self.rows)
        w = self.weight()[local.clamp(0, self.rows - 1)]  # [2, h]
        logits = (x @ w.t()) * owned.to(x.dtype)  # [b, 2], zero for rows another rank owns
        logits = tensor_parallel.reduce_from_tensor_model_parallel_region(logits)
        return logits[:, 0] - logits[:, 1]
