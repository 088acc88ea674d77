"""Rerank losses as pure tensor functions over group scores.

Every loss takes ``scores`` shaped [B, G]: B query groups of G documents, the positive at column 0
(the collator's order), and returns one loss per group, [B]. Averaging over groups, micro-batches
and data-parallel ranks happens in one place: ``training/step.py``.

Every loss also takes an optional ``mask`` [B, G] (True for a real document, False for padding;
column 0 is always real): a padded document, whatever its score or teacher score (NaN included),
never changes a loss or its gradients.

Losses that learn an order or a distribution (``ranknet``, ``lambdarank``, ``listnet``) learn
either the labels' (the positive above its negatives, the negatives tied) or the teacher's
(``target="teacher"``); ``distill`` and ``margin_mse`` always learn the teacher's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("listwise", "pairwise", "pointwise", "distill", "margin_mse", "ranknet", "lambdarank",
          "listnet")
"""The values of ``task.loss``."""
TARGETED = ("ranknet", "lambdarank", "listnet")
"""Losses whose order or distribution comes from ``task.target``."""
TARGETS = ("labels", "teacher")
DISTILL_TERMS = ("kl", "margin_mse", "ranknet", "lambdarank", "listnet")
"""What ``task.distill_weight`` adds: a teacher term (the last three with the teacher's order)."""


def _real(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask as bool [B, G], all True when None."""
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    return mask.to(device=scores.device, dtype=torch.bool)


def _fill(x: torch.Tensor, real: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` with padded entries replaced by ``value`` (so a NaN there never reaches a gradient)."""
    return x.masked_fill(~real, value)


def label_relevance(scores: torch.Tensor) -> torch.Tensor:
    """The labels as relevance [B, G]: 1 for the positive (column 0), 0 for the negatives."""
    rel = torch.zeros_like(scores, dtype=torch.float32)
    rel[:, 0] = 1.0
    return rel


def listwise_loss(scores: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of the positive among its group (FlagEmbedding's reranker loss)."""
    real = _real(scores, mask)
    logits = _fill(scores / temperature, real, -math.inf)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(logits, target, reduction="none")


def pairwise_loss(scores: torch.Tensor, margin: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean hinge ``max(0, margin - (s_pos - s_neg))`` over the group's G-1 negatives."""
    real = _real(scores, mask)[:, 1:]  # [B, G-1]
    scores = _fill(scores, _real(scores, mask), 0.0)
    diff = scores[:, :1] - scores[:, 1:]  # [B, G-1]
    hinge = F.relu(margin - diff) * real
    return hinge.sum(dim=1) / real.sum(dim=1).clamp(min=1)


def pointwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of every logit against 1 (positive) or 0 (negatives), mean per group."""
    real = _real(scores, mask)
    scores = _fill(scores, real, 0.0)
    bce = F.binary_cross_entropy_with_logits(scores, label_relevance(scores), reduction="none")
    return (bce * real).sum(dim=1) / real.sum(dim=1)


def _log_softmax(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """log_softmax over the real documents; 0 (not -inf) at padded ones, so products stay finite."""
    return _fill(F.log_softmax(_fill(x, real, -math.inf), dim=1), real, 0.0)


def distill_loss(scores: torch.Tensor, teacher: torch.Tensor,
                 teacher_temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(scores)) over each group: listwise knowledge
    distillation from teacher scores, e.g. a retriever's similarities or a larger reranker's
    logits (FlagEmbedding's pos_scores/neg_scores)."""
    real = _real(scores, mask)
    target = _log_softmax(teacher.float() / teacher_temperature, real)
    student = _log_softmax(scores, real)
    return (target.exp() * (target - student) * real).sum(dim=1)


def margin_mse_loss(scores: torch.Tensor, teacher: torch.Tensor,
                    teacher_temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """MarginMSE (Hofstätter et al., 2020): the mean over negatives j of
    ``((s_pos - s_j) - (t_pos - t_j) / T)^2``.

    The student learns the teacher's margins, not its distribution. T rescales the teacher to the
    student's logits: T = 1 is the paper's (a cross-encoder teacher's logits); cosine
    similarities have margins near 0.1, T = 0.05 makes them logit-sized.
    """
    real = _real(scores, mask)
    s = _fill(scores, real, 0.0)
    t = _fill(teacher.float(), real, 0.0) / teacher_temperature
    err = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])  # [B, G-1]
    neg = real[:, 1:]
    return (err.square() * neg).sum(dim=1) / neg.sum(dim=1).clamp(min=1)


def _ordered_pairs(relevance: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, G, G] True where document i is strictly more relevant than j, both real (ties and
    padding make no pair)."""
    rel = _fill(relevance.float(), real, 0.0)
    both = real[:, :, None] & real[:, None, :]
    return (rel[:, :, None] > rel[:, None, :]) & both


def _pair_logistic(scores: torch.Tensor, real: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, G, G] RankNet's ``log(1 + exp(-(s_i - s_j) / temperature))``."""
    s = _fill(scores, real, 0.0) / temperature
    return F.softplus(-(s[:, :, None] - s[:, None, :]))


def ranknet_loss(scores: torch.Tensor, relevance: torch.Tensor, temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """RankNet (Burges et al., 2005): the mean over every ordered pair (i more relevant than j)
    of ``log(1 + exp(-(s_i - s_j) / temperature))``. ``relevance`` [B, G] gives the order:
    :func:`label_relevance` or teacher scores; tied documents make no pair."""
    real = _real(scores, mask)
    pairs = _ordered_pairs(relevance, real)
    loss = (_pair_logistic(scores, real, temperature) * pairs).sum(dim=(1, 2))
    return loss / pairs.sum(dim=(1, 2)).clamp(min=1)


def lambdarank_loss(scores: torch.Tensor, gains: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """LambdaRank's NDCG-weighted RankNet (Burges 2010; LambdaLoss's "lambdaRank" scheme, Wang et
    al. 2018): the sum over ordered pairs (gain_i > gain_j) of ``|dNDCG_ij| * log(1 +
    exp(-(s_i - s_j) / temperature))``.

    ``|dNDCG_ij| = |g_i - g_j| * |1/log2(1 + r_i) - 1/log2(1 + r_j)| / IDCG`` is how much NDCG
    would change were i and j swapped in the student's current ranking (ranks r from the
    detached scores, padded documents below every real one); pairs that matter at the top of the
    list weigh most. ``gains`` [B, G]: the labels, or the teacher's softmax.
    """
    real = _real(scores, mask)
    g = _fill(gains.float(), real, 0.0)
    pairs = _ordered_pairs(g, real)
    with torch.no_grad():
        order = torch.argsort(_fill(scores.detach().float(), real, -math.inf), dim=1,
                              descending=True, stable=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(1, scores.shape[1] + 1, device=scores.device)
        ranks.scatter_(1, order, positions.expand_as(order))  # 1 = top
        discount = 1.0 / torch.log2(1.0 + ranks.float())  # [B, G]
        ideal = (torch.sort(g, dim=1, descending=True).values
                 / torch.log2(1.0 + positions.float())).sum(dim=1)  # [B]
        delta = ((g[:, :, None] - g[:, None, :]).abs()
                 * (discount[:, :, None] - discount[:, None, :]).abs()
                 / ideal.clamp(min=1e-12)[:, None, None])  # [B, G, G]
    return (delta * _pair_logistic(scores, real, temperature) * pairs).sum(dim=(1, 2))


def listnet_loss(scores: torch.Tensor, relevance: torch.Tensor, temperature: float = 1.0,
                 target_temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """ListNet (Cao et al., 2007), top-one probabilities with temperatures: the cross-entropy
    ``-sum_i p_i log q_i`` of q = softmax(scores / temperature) from p = softmax(relevance /
    target_temperature) (the labels or the teacher's scores)."""
    real = _real(scores, mask)
    target = _log_softmax(relevance.float() / target_temperature, real).exp() * real
    return -(target * _log_softmax(scores / temperature, real)).sum(dim=1)


def needs_teacher(loss: str, target: str = "labels", distill_weight: float = 0.0) -> bool:
    """Whether ``task.loss`` / ``task.target`` / ``task.distill_weight`` read teacher scores."""
    return (loss in ("distill", "margin_mse") or (loss in TARGETED and target == "teacher")
            or distill_weight > 0)


def _teacher_loss(name: str, scores: torch.Tensor, teacher: torch.Tensor, temperature: float,
                  teacher_temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """A term that learns the teacher: ``kl`` (= ``distill``), margin_mse, or a targeted loss on
    the teacher's order."""
    if name in ("kl", "distill"):
        return distill_loss(scores, teacher, teacher_temperature, mask)
    if name == "margin_mse":
        return margin_mse_loss(scores, teacher, teacher_temperature, mask)
    return _targeted(name, scores, teacher, "teacher", temperature, teacher_temperature, mask)


def _targeted(name: str, scores: torch.Tensor, teacher: torch.Tensor | None, target: str,
              temperature: float, teacher_temperature: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    """ranknet / lambdarank / listnet on the labels' or the teacher's order."""
    relevance = teacher.float() if target == "teacher" else label_relevance(scores)
    if name == "ranknet":
        return ranknet_loss(scores, relevance, temperature, mask)
    if name == "lambdarank":
        # NDCG gains: the labels (1 / 0), or the teacher's distribution softmax(teacher / T)
        # (NDCG is invariant to the gains' scale, so only their ratios matter).
        gains = relevance
        if target == "teacher":
            gains = torch.softmax(_fill(relevance / teacher_temperature, _real(scores, mask),
                                        -math.inf), dim=1)
        return lambdarank_loss(scores, gains, temperature, mask)
    if name == "listnet":
        return listnet_loss(scores, relevance, temperature, teacher_temperature, mask)
    raise ValueError(f"unknown targeted loss {name!r}")


def group_loss(scores: torch.Tensor, loss: str, temperature: float = 1.0,
               margin: float = 1.0, teacher: torch.Tensor | None = None,
               distill_weight: float = 0.0, teacher_temperature: float = 1.0, *,
               target: str = "labels", hard_weight: float = 1.0, distill_term: str = "kl",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``task.loss``; scores [B, G] -> per-group losses [B].

    The result is ``hard_weight * L(loss) + distill_weight * L(distill_term)`` (the second term
    only when ``distill_weight > 0``): a mixed hard-label + distillation loss. ``distill`` and
    ``margin_mse`` learn the teacher alone; ``ranknet``, ``lambdarank`` and ``listnet`` learn
    the order ``target`` names. Whatever reads the teacher needs ``teacher`` ([B, G]).
    """
    if loss not in LOSSES:
        raise ValueError(f"task.loss ({loss!r}) must be one of {', '.join(LOSSES)}")
    if target not in TARGETS:
        raise ValueError(f"task.target ({target!r}) must be one of {', '.join(TARGETS)}")
    if distill_term not in DISTILL_TERMS:
        raise ValueError(f"task.distill_term ({distill_term!r}) must be one of "
                         f"{', '.join(DISTILL_TERMS)}")
    if needs_teacher(loss, target, distill_weight) and teacher is None:
        raise ValueError(f"task.loss {loss!r} (task.target {target!r}) with task.distill_weight "
                         f"{distill_weight} needs teacher scores (pos_scores/neg_scores in the "
                         "training data)")
    if loss in ("distill", "margin_mse"):
        primary = _teacher_loss(loss, scores, teacher, temperature, teacher_temperature, mask)
    elif loss in TARGETED:
        primary = _targeted(loss, scores, teacher, target, temperature, teacher_temperature,
                            mask)
    elif loss == "listwise":
        primary = listwise_loss(scores, temperature, mask)
    elif loss == "pairwise":
        primary = pairwise_loss(scores, margin, mask)
    else:
        primary = pointwise_loss(scores, mask)
    total = primary if hard_weight == 1.0 else hard_weight * primary
    if distill_weight > 0:
        total = total + distill_weight * _teacher_loss(distill_term, scores, teacher, temperature,
                                                       teacher_temperature, mask)
    return total
