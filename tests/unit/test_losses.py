"""Rerank losses: values against hand computations, and the gradients they give."""

from __future__ import annotations

import math

import pytest
import torch

from megarank.training.losses import group_loss, listwise_loss, pairwise_loss, pointwise_loss


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
