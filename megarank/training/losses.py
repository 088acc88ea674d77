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


def distill_loss(scores: torch.Tensor, teacher: torch.Tensor,
                 teacher_temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(scores)) over each group: listwise knowledge
    distillation from teacher scores, e.g. a retriever's similarities or a larger reranker's
    logits (FlagEmbedding's pos_scores/neg_scores)."""
    target = F.log_softmax(teacher.float() / teacher_temperature, dim=1)
    return F.kl_div(F.log_softmax(scores, dim=1), target, log_target=True,
                    reduction="none").sum(dim=1)


def group_loss(scores: torch.Tensor, loss: str, temperature: float = 1.0,
               margin: float = 1.0, teacher: torch.Tensor | None = None,
               distill_weight: float = 0.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Dispatch on ``task.loss``; scores [B, G] -> per-group losses [B].

    ``distill`` is the distillation term alone; any other loss gets ``distill_weight`` times that
    term added when ``distill_weight > 0``. Both need ``teacher`` ([B, G]).
    """
    needs_teacher = loss == "distill" or distill_weight > 0
    if needs_teacher and teacher is None:
        raise ValueError(f"task.loss {loss!r} with task.distill_weight {distill_weight} needs "
                         "teacher scores (pos_scores/neg_scores in the training data)")
    if loss == "distill":
        return distill_loss(scores, teacher, teacher_temperature)
    if loss == "listwise":
        hard = listwise_loss(scores, temperature)
    elif loss == "pairwise":
        hard = pairwise_loss(scores, margin)
    elif loss == "pointwise":
        hard = pointwise_loss(scores)
    else:
        raise ValueError(f"task.loss ({loss!r}) must be one of listwise, pairwise, pointwise, "
                         "distill")
    if distill_weight > 0:
        hard = hard + distill_weight * distill_loss(scores, teacher, teacher_temperature)
    return hard
