"""Rerank losses: values against hand computations, and the gradients they give."""

from __future__ import annotations

import math

import pytest
import torch

from megarank.training.losses import (
    distill_loss,
    group_loss,
    listwise_loss,
    pairwise_loss,
    pointwise_loss,
)


def test_listwise_is_softmax_ce_of_the_positive():
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    expected = [-(2 - math.log(math.e**2 + math.e + 1)), math.log(3)]
    assert listwise_loss(s).tolist() == pytest.approx(expected, abs=1e-6)
    # temperature divides the scores
    assert listwise_loss(s, temperature=2.0)[0].item() == pytest.approx(
        listwise_loss(s / 2.0)[0].item(), abs=1e-7)


def test_pairwise_hinge_over_negatives():
    s = torch.tensor([[1.0, 0.5, 2.0, -3.0]])
    # margins: 1-(0.5)=0.5, 1-(-1)=2, 1-4<0 -> 0 ; mean over 3 negatives
    assert pairwise_loss(s, margin=1.0).item() == pytest.approx((0.5 + 2.0 + 0.0) / 3)


def test_pointwise_bce_labels_positive_first():
    s = torch.tensor([[0.0, 0.0]])
    assert pointwise_loss(s).item() == pytest.approx(math.log(2))
    s = torch.tensor([[10.0, -10.0]])
    assert pointwise_loss(s).item() < 1e-4


@pytest.mark.parametrize("loss", ["listwise", "pairwise", "pointwise"])
def test_gradient_raises_positive_and_lowers_negatives(loss):
    s = torch.zeros(3, 4, requires_grad=True)
    group_loss(s, loss, margin=1.0).mean().backward()
    assert (s.grad[:, 0] < 0).all()  # descending the loss raises the positive
    assert (s.grad[:, 1:] > 0).all()


def test_unknown_loss_names_the_field():
    with pytest.raises(ValueError, match="task.loss"):
        group_loss(torch.zeros(1, 2), "ranknet")


def test_distill_is_kl_from_the_tempered_teacher():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.9, 0.7, 0.1]])  # e.g. cosine similarities
    p = torch.softmax(t / 0.05, dim=1)
    expected = (p * (p.log() - torch.log_softmax(s, dim=1))).sum().item()
    assert distill_loss(s, t, 0.05).item() == pytest.approx(expected, rel=1e-6)
    # zero exactly when the student's distribution is the teacher's (any shift of the scores)
    assert distill_loss(t / 0.05 + 3.0, t, 0.05).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_weight_adds_the_kl_term_and_needs_teacher_scores():
    s = torch.tensor([[0.5, 0.2, 0.1, -0.3]])
    t = torch.tensor([[0.2, 0.9, 0.1, 0.0]])
    hard = group_loss(s, "listwise")
    both = group_loss(s, "listwise", teacher=t, distill_weight=0.5, teacher_temperature=0.1)
    assert (both - hard).item() == pytest.approx(0.5 * distill_loss(s, t, 0.1).item(), rel=1e-6)
    assert group_loss(s, "distill", teacher=t).item() == pytest.approx(distill_loss(s, t).item())
    with pytest.raises(ValueError, match="teacher scores"):
        group_loss(s, "distill")
    with pytest.raises(ValueError, match="teacher scores"):
        group_loss(s, "pointwise", distill_weight=1.0)


def test_distill_gradient_follows_the_teacher_not_the_label():
    # The teacher prefers document 1 over the labelled positive: pure distillation raises it.
    s = torch.zeros(1, 3, requires_grad=True)
    group_loss(s, "distill", teacher=torch.tensor([[0.0, 2.0, -2.0]])).sum().backward()
    assert s.grad[0, 1] < 0 < s.grad[0, 2]
