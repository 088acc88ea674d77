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
        group_loss(torch.zeros(1, 2), "softrank")


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


# --- MarginMSE, RankNet, LambdaRank, ListNet, and the mixed hard + distillation loss ---------

from megarank.training.losses import (  # noqa: E402
    LOSSES,
    label_relevance,
    lambdarank_loss,
    listnet_loss,
    margin_mse_loss,
    needs_teacher,
    ranknet_loss,
)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_margin_mse_against_hand_computation():
    s = torch.tensor([[2.0, 1.0, -1.0]])
    t = torch.tensor([[0.9, 0.8, 0.4]])
    # student margins 1, 3; teacher margins 0.1, 0.5 (T = 1) or 2, 10 (T = 0.05)
    assert margin_mse_loss(s, t).item() == pytest.approx(((1 - 0.1) ** 2 + (3 - 0.5) ** 2) / 2)
    assert margin_mse_loss(s, t, 0.05).item() == pytest.approx(((1 - 2) ** 2 + (3 - 10) ** 2) / 2,
                                                               rel=1e-5)
    # zero exactly when every margin matches, whatever the shift of the scores
    assert margin_mse_loss(t + 5.0, t).item() == pytest.approx(0.0, abs=1e-10)
    assert group_loss(s, "margin_mse", teacher=t, teacher_temperature=0.05).item() == \
        pytest.approx(margin_mse_loss(s, t, 0.05).item())


def test_ranknet_labels_and_teacher_order_with_ties():
    s = torch.tensor([[0.0, 1.0, 2.0]])
    # labels: pairs (0,1), (0,2) only; the two negatives are tied and make no pair
    expected = (_softplus(1.0) + _softplus(2.0)) / 2
    assert ranknet_loss(s, label_relevance(s)).item() == pytest.approx(expected, rel=1e-6)
    assert group_loss(s, "ranknet").item() == pytest.approx(expected, rel=1e-6)
    # temperature 2 halves the differences
    assert ranknet_loss(s, label_relevance(s), 2.0).item() == pytest.approx(
        (_softplus(0.5) + _softplus(1.0)) / 2, rel=1e-6)
    # teacher 0.9 > 0.5 = 0.5: documents 1 and 2 tie, so again only (0,1), (0,2)
    t = torch.tensor([[0.9, 0.5, 0.5]])
    assert group_loss(s, "ranknet", teacher=t, target="teacher").item() == pytest.approx(
        expected, rel=1e-6)
    # teacher order 2 > 1 > 0: pairs (2,1), (2,0), (1,0)
    t = torch.tensor([[0.1, 0.5, 0.9]])
    expected = (_softplus(-1.0) + _softplus(-2.0) + _softplus(-1.0)) / 3
    assert group_loss(s, "ranknet", teacher=t, target="teacher").item() == pytest.approx(
        expected, rel=1e-6)
    # a teacher that ties everything orders nothing: no pair, loss 0, zero gradient
    x = torch.randn(2, 4, requires_grad=True)
    out = group_loss(x, "ranknet", teacher=torch.full((2, 4), 0.3), target="teacher")
    out.sum().backward()
    assert out.tolist() == [0.0, 0.0] and (x.grad == 0).all()


def test_lambdarank_weights_pairs_by_their_ndcg_change():
    s = torch.tensor([[0.0, 1.0, 2.0]])
    # student ranking: doc 2 first, doc 1 second, the positive third; IDCG = 1
    d = [1 / math.log2(4), 1 / math.log2(3), 1 / math.log2(2)]  # discounts of docs 0, 1, 2
    expected = abs(d[0] - d[1]) * _softplus(1.0) + abs(d[0] - d[2]) * _softplus(2.0)
    assert lambdarank_loss(s, label_relevance(s)).item() == pytest.approx(expected, rel=1e-6)
    assert group_loss(s, "lambdarank").item() == pytest.approx(expected, rel=1e-6)
    # graded gains: |g_i - g_j| scales each pair, IDCG normalises
    g = torch.tensor([[3.0, 1.0, 0.0]])
    idcg = 3.0 / math.log2(2) + 1.0 / math.log2(3)
    expected = (2 * abs(d[0] - d[1]) * _softplus(1.0) + 3 * abs(d[0] - d[2]) * _softplus(2.0)
                + 1 * abs(d[1] - d[2]) * _softplus(1.0)) / idcg
    assert lambdarank_loss(s, g).item() == pytest.approx(expected, rel=1e-6)
    # target teacher: the gains are softmax(teacher / T)
    t = torch.tensor([[0.2, 0.1, 0.0]])
    gains = torch.softmax(t / 0.1, dim=1)
    assert group_loss(s, "lambdarank", teacher=t, target="teacher",
                      teacher_temperature=0.1).item() == pytest.approx(
        lambdarank_loss(s, gains).item(), rel=1e-6)
    # a correctly ordered list still pays RankNet's loss, scaled by the swap's NDCG cost
    right = torch.tensor([[2.0, 1.0, 0.0]])
    expected = abs(1 - 1 / math.log2(3)) * _softplus(-1.0) + abs(1 - 0.5) * _softplus(-2.0)
    assert lambdarank_loss(right, label_relevance(right)).item() == pytest.approx(expected,
                                                                                  rel=1e-6)


def test_listnet_is_cross_entropy_of_tempered_softmaxes():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.9, 0.7, 0.1]])
    p = torch.softmax(t / 0.05, dim=1)
    q = torch.log_softmax(s / 2.0, dim=1)
    expected = -(p * q).sum().item()
    assert listnet_loss(s, t, 2.0, 0.05).item() == pytest.approx(expected, rel=1e-6)
    assert group_loss(s, "listnet", 2.0, teacher=t, target="teacher",
                      teacher_temperature=0.05).item() == pytest.approx(expected, rel=1e-6)
    # labels: softmax([1, 0, 0]) is the target; cross-entropy = KL + the target's entropy
    p = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    expected = -(p * torch.log_softmax(s[0], dim=0)).sum().item()
    assert group_loss(s, "listnet").item() == pytest.approx(expected, rel=1e-6)
    entropy = -(p * p.log()).sum().item()
    assert group_loss(s, "listnet").item() - entropy == pytest.approx(
        distill_loss(s, label_relevance(s)).item(), rel=1e-5)


def test_mixed_hard_and_distillation_weights():
    s = torch.tensor([[0.5, 0.2, 0.1, -0.3], [0.0, 1.0, 0.0, 2.0]])
    t = torch.tensor([[0.2, 0.9, 0.1, 0.0], [0.8, 0.1, 0.3, 0.2]])
    hard = listwise_loss(s)
    for term, fn in (("kl", lambda: distill_loss(s, t, 0.05)),
                     ("margin_mse", lambda: margin_mse_loss(s, t, 0.05)),
                     ("ranknet", lambda: ranknet_loss(s, t)),
                     ("listnet", lambda: listnet_loss(s, t, 1.0, 0.05))):
        mixed = group_loss(s, "listwise", teacher=t, distill_weight=0.7, teacher_temperature=0.05,
                           hard_weight=0.25, distill_term=term)
        torch.testing.assert_close(mixed, 0.25 * hard + 0.7 * fn(), rtol=1e-6, atol=1e-7)
    # hard_weight 0: the distillation term alone
    torch.testing.assert_close(
        group_loss(s, "pairwise", teacher=t, distill_weight=1.0, hard_weight=0.0,
                   distill_term="margin_mse"), margin_mse_loss(s, t))
    with pytest.raises(ValueError, match="task.distill_term"):
        group_loss(s, "listwise", teacher=t, distill_weight=1.0, distill_term="mse")
    with pytest.raises(ValueError, match="task.target"):
        group_loss(s, "ranknet", target="bm25")


@pytest.mark.parametrize("loss,target", [("margin_mse", "labels"), ("ranknet", "teacher"),
                                         ("lambdarank", "teacher"), ("listnet", "teacher")])
def test_teacher_losses_need_teacher_scores(loss, target):
    assert needs_teacher(loss, target)
    with pytest.raises(ValueError, match="teacher scores"):
        group_loss(torch.zeros(1, 3), loss, target=target)
    assert not needs_teacher("ranknet", "labels") and not needs_teacher("listnet", "labels")


# Every loss with what it reads: (loss, group_loss keyword arguments).
ALL = [
    ("listwise", {}), ("pairwise", {}), ("pointwise", {}),
    ("distill", {"teacher_temperature": 0.1}),
    ("margin_mse", {"teacher_temperature": 0.1}),
    ("ranknet", {}), ("ranknet", {"target": "teacher"}),
    ("lambdarank", {}), ("lambdarank", {"target": "teacher", "teacher_temperature": 0.1}),
    ("listnet", {}), ("listnet", {"target": "teacher", "teacher_temperature": 0.1}),
    ("listwise", {"distill_weight": 0.5, "hard_weight": 0.5, "teacher_temperature": 0.1}),
    ("pointwise", {"distill_weight": 1.0, "distill_term": "margin_mse"}),
    ("listwise", {"distill_weight": 1.0, "distill_term": "lambdarank"}),
]
IDS = [f"{loss}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for loss, kw in ALL]


def _call(scores, loss, kw, teacher, mask=None):
    return group_loss(scores, loss, teacher=teacher, mask=mask, **kw)


def test_every_config_loss_is_covered():
    from megarank.config.validate import LOSSES as CONFIG_LOSSES

    assert CONFIG_LOSSES == LOSSES  # the config's list is the dispatcher's
    assert {loss for loss, _ in ALL} == set(LOSSES)


@pytest.mark.parametrize("loss,kw", ALL, ids=IDS)
def test_gradients_finite_including_ties_and_extremes(loss, kw):
    torch.manual_seed(0)
    teacher = torch.rand(3, 5)
    for scores in (torch.randn(3, 5), torch.zeros(3, 5),  # all tied
                   torch.tensor([[80.0, -80.0, 0.0, 80.0, -80.0]] * 3)):  # saturating
        s = scores.clone().requires_grad_(True)
        out = _call(s, loss, kw, teacher)
        out.sum().backward()
        assert out.shape == (3,) and torch.isfinite(out).all() and (out >= -1e-6).all()
        assert torch.isfinite(s.grad).all()
    # tied teacher scores stay finite too
    s = torch.randn(3, 5, requires_grad=True)
    _call(s, loss, kw, torch.full((3, 5), 0.5)).sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss,kw", ALL, ids=IDS)
def test_a_padded_document_never_changes_a_loss(loss, kw):
    torch.manual_seed(1)
    scores, teacher = torch.randn(4, 5), torch.rand(4, 5)
    s_ref = scores.clone().requires_grad_(True)
    ref = _call(s_ref, loss, kw, teacher)
    ref.sum().backward()
    # the same groups with two padded columns slipped in (after the positive), holding
    # anything: huge scores, NaN, a teacher score above the positive's
    keep = [0, 1, 3, 4, 6]  # positions of the real documents in the padded group of 7
    for pad_score, pad_teacher in ((1e4, 2.0), (float("nan"), float("nan")), (-3.0, 0.0)):
        padded = torch.full((4, 7), pad_score)
        padded_t = torch.full((4, 7), pad_teacher)
        padded[:, keep], padded_t[:, keep] = scores, teacher
        mask = torch.zeros(4, 7, dtype=torch.bool)
        mask[:, keep] = True
        s = padded.clone().requires_grad_(True)
        out = _call(s, loss, kw, padded_t, mask)
        out.sum().backward()
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.grad[:, keep], s_ref.grad, rtol=1e-5, atol=1e-6)
        assert (s.grad[:, [2, 5]] == 0).all()
    # an all-True mask is no mask
    torch.testing.assert_close(_call(scores, loss, kw, teacher, torch.ones(4, 5, dtype=torch.bool)),
                               ref.detach())


def _ndcg_of(scores: torch.Tensor, gains: torch.Tensor) -> float:
    """Mean NDCG of ranking by ``scores`` with ``gains`` (the reference for the learning test)."""
    order = scores.argsort(dim=1, descending=True)
    disc = 1.0 / torch.log2(torch.arange(2, scores.shape[1] + 2).float())
    dcg = (gains.gather(1, order) * disc).sum(1)
    idcg = (gains.sort(dim=1, descending=True).values * disc).sum(1)
    return float((dcg / idcg).mean())


@pytest.mark.parametrize("loss,kw", ALL, ids=IDS)
def test_each_loss_learns(loss, kw):
    """A few dozen Adam steps on a tiny linear scorer lower the loss and improve the ranking the
    loss asks for (the labels', or the teacher's when the loss reads only the teacher)."""
    torch.manual_seed(2)
    feats = torch.randn(6, 5, 3)  # [B, G, features]
    teacher = feats @ torch.tensor([1.0, -0.5, 0.25])  # a teacher the scorer can match
    teacher = teacher - teacher.min() + 0.1
    # the positive: column 0 holds the teacher's best document, so labels and teacher agree
    best = teacher.argmax(dim=1)
    idx = torch.arange(5).repeat(6, 1)
    idx[torch.arange(6), best], idx[:, 0] = 0, best
    feats, teacher = feats.gather(1, idx[..., None].expand_as(feats)), teacher.gather(1, idx)
    # start from the reversed ranking: the worst one
    w = torch.tensor([-1.0, 0.5, -0.25], requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)

    def value():
        return _call(feats @ w, loss, kw, teacher).mean()

    # what the loss asks for: the teacher's order when it reads only the teacher's order
    graded = loss in ("distill", "margin_mse") or kw.get("target") == "teacher"
    gains = teacher if graded else label_relevance(teacher)
    first, ndcg0 = value().item(), _ndcg_of((feats @ w).detach(), gains)
    for _ in range(40):
        opt.zero_grad()
        value().backward()
        opt.step()
    last = value().item()
    assert last < 0.8 * first, (first, last)
    assert _ndcg_of((feats @ w).detach(), gains) > max(ndcg0, 0.9)


@pytest.mark.parametrize("task", ["margin_mse", "ranknet", "lambdarank", "listnet", "mixed"])
def test_loss_presets_compose_and_validate(task):
    from megarank.config import compose, validate

    cfg = compose(["model=bert_tiny", f"task={task}"])
    validate(cfg, world_size=1)
    assert cfg.task.loss in LOSSES


@pytest.mark.parametrize("overrides,field", [
    (["task.loss=ranknet", "task.target=bm25"], "task.target"),
    (["task.loss=listwise", "task.distill_term=mse"], "task.distill_term"),
    (["task.loss=listwise", "task.hard_weight=-1"], "task.hard_weight"),
    (["task.loss=listwise", "task.hard_weight=0"], "task.hard_weight and task.distill_weight"),
    (["task.loss=lambdarank", "task.group_size=1"], "task.group_size"),
    (["task.loss=softrank"], "task.loss"),
])
def test_bad_loss_settings_name_the_field(overrides, field):
    from megarank.config import ConfigError, compose, validate

    with pytest.raises(ConfigError, match=field):
        validate(compose(["model=bert_tiny", "task=listwise", *overrides]), world_size=1)


@pytest.mark.parametrize("overrides", [["task=margin_mse"], ["task=ranknet", "task.target=teacher"]])
def test_training_without_teacher_scores_names_the_file(overrides, tmp_path):
    import megarank
    from megarank.config import ConfigError
    from megarank.config.schema import ASSETS

    plain = ASSETS / "collections/cranfield/train_triplets.jsonl"  # no pos_scores/neg_scores
    with pytest.raises(ConfigError, match=r"train_triplets\.jsonl:1: record has no teacher"):
        megarank.train_model(["model=bert_tiny", *overrides, "data=beir",
                              f"data.train_path={plain}", "trainer.max_steps=2",
                              "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
                              "trainer.progress_bar=false", f"trainer.output_dir={tmp_path}"])
