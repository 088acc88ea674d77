"""Rerank losses as pure tensor functions over group scores.

Every loss takes ``scores`` shaped [B, G]: B query groups of G documents, the positive at column 0
(the collator's order), and returns one loss per group, [B]. Averaging over groups, micro-batches
and data-parallel ranks happens in one place: ``training/step.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_loss(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax cross-entropy of the positive among its group (FlagEmbedding's reranker loss)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores / temperature, target, reduction="none")


def pairwise_loss(scores: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean hinge ``max(0, margin - (s_pos - s_neg))`` over the group's G-1 negatives."""
    diff = scores[:, :1] - scores[:, 1:]  # [B, G-1]
    return F.relu(margin - diff).mean(dim=1)


def pointwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every logit against 1 (positive) or 0 (negatives), mean per group."""
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels, reduction="none").mean(dim=1)


def group_loss(scores: torch.Tensor, loss: str, temperature: float = 1.0,
               margin: float = 1.0) -> torch.Tensor:
    """Dispatch on ``task.loss``; scores [B, G] -> per-group losses [B]."""
    if loss == "listwise":
        return listwise_loss(scores, temperature)
    if loss == "pairwise":
        return pairwise_loss(scores, margin)
    if loss == "pointwise":
        return pointwise_loss(scores)
    raise ValueError(f"task.loss ({loss!r}) must be one of listwise, pairwise, pointwise")
