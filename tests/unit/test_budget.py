"""Micro-batches cut by tokens (data.tokens_per_micro_batch): groups kept whole and in order,
each micro-batch within the budget, and training that equals fixed micro-batches of the same
groups (the loss weighed by each micro-batch's share of the step's groups)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import megarank
from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.config.validate import ConfigError, validate
from megarank.data.budget import group_rows, micro_batch_tokens, split_by_tokens
from megarank.data.groups import Group

WORDS = ("lift drag boundary layer shock wave flat plate heat transfer mach number cone flow "
         "wing tunnel turbulent laminar pressure").split()


def _groups(n: int, group_size: int) -> list[Group]:
    """Groups whose documents run from 1 to 80 words, so their token counts differ."""
    out = []
    for i in range(n):
        docs = tuple(" ".join(WORDS[(i + j + k) % len(WORDS)]
                              for k in range(1 + (7 * i + 11 * j) % 80))
                     for j in range(group_size))
        out.append(Group(query=f"query {WORDS[i % len(WORDS)]}", docs=docs, record_index=i,
                         teacher=tuple(float(i + j) for j in range(group_size))))
    return out


def _rows(batch) -> list[list[int]]:
    """Each row's real tokens."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask,
                                                     strict=True)]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("maxp", [False, True], ids=["firstp", "maxp"])
def test_split_keeps_groups_whole_in_order_and_within_the_budget(packing, maxp):
    cfg = compose(["model=bert_tiny", "task.group_size=3", "pair.max_length=64",
                   "pair.max_query_length=8", f"data.packing={str(packing).lower()}",
                   "data.packed_multiple=8",
                   *(["data.passages=max", "data.train_passages=2"] if maxp else [])])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        c = bundle.collator
        groups = _groups(8, 3)
        whole = c(groups)
        if maxp:  # as training reads MaxP groups (prepared tokens, each document's windows)
            docs = c.truncation.full_documents([d for g in groups for d in g.docs])
            whole = replace(c.encode_windows(c.tokenize_queries([g.query for g in groups]), docs,
                                             [i for i in range(8) for _ in range(3)], 3,
                                             max_windows=2),
                            teacher_scores=whole.teacher_scores)
    if maxp:
        assert whole.num_rows > 8 * 3  # some documents are read as two windows
    budget = 3 * 64 * (2 if maxp else 1) + 64
    parts = split_by_tokens(whole, budget, c.pad_to_multiple_of, c.packed_multiple)
    assert 1 < len(parts) < 8
    sizes = [len(group_rows(p)) for p in parts]
    assert sum(sizes) == 8 and len(set(sizes)) > 1  # short groups share, long ones do not
    rows, teacher, scored = [], [], []
    for p in parts:
        laid = c.model_layout(p)
        cost = laid.input_ids.numel()
        assert cost <= budget
        assert cost == micro_batch_tokens(p.attention_mask.sum(1).tolist(), c.pad_to_multiple_of,
                                          c.packed_multiple)
        rows += _rows(p)
        teacher += p.teacher_scores.tolist()
        if maxp:  # each document's windows, as rows of the whole batch
            scored += [[r for r in w.tolist() if r >= 0] for w in p.windows]
    assert rows == _rows(whole)
    assert teacher == whole.teacher_scores.tolist()
    if maxp:
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p.num_rows)
        shifted = []
        for p, off in zip(parts, offsets, strict=False):
            shifted += [[r + off for r in w.tolist() if r >= 0] for w in p.windows]
        assert shifted == [[r for r in w.tolist() if r >= 0] for w in whole.windows]
    with pytest.raises(ValueError, match="data.tokens_per_micro_batch"):
        split_by_tokens(whole, 16, c.pad_to_multiple_of, c.packed_multiple)


def test_the_budget_must_hold_a_group_at_its_longest():
    cfg = compose(["model=bert_tiny", "task.group_size=4", "pair.max_length=128",
                   "data.tokens_per_micro_batch=500"])
    with pytest.raises(ConfigError, match=r"data.tokens_per_micro_batch \(500\).*= 512"):
        validate(cfg, world_size=1)
    cfg = compose(["model=bert_tiny", "task.group_size=4", "pair.max_length=128",
                   "data.tokens_per_micro_batch=512", "trainer.global_batch_size=3"])
    with pytest.raises(ConfigError, match="multiple of the data-parallel size"):
        validate(cfg, world_size=2)
    # trainer.micro_batch_size is not read: 3 groups a step on one rank is fine
    assert validate(cfg, world_size=1).num_microbatches == 3


def _train(tmp_path, name, extra):
    out = tmp_path / name
    megarank.train_model([
        "model=gpt_tiny", "task=listwise", "task.group_size=4", "data=cranfield",
        "pair.max_length=256", "pair.max_query_length=16", "model.hidden_dropout=0",
        "model.attention_dropout=0", "trainer.max_steps=3", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=1", "trainer.log_interval=1", "trainer.save_final=false",
        "trainer.eval_at_end=false", "trainer.progress_bar=false", "optim.warmup_steps=0",
        f"trainer.output_dir={out}", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_training_by_tokens_equals_fixed_micro_batches(tmp_path):
    """Three steps of 4 Cranfield groups: one group a micro-batch, against the same groups cut by
    a packed budget into 2 or 3 micro-batches of unequal size (3 of 4 groups cannot be equal),
    the losses and gradient norms equal to 1e-5. Without the loss weighing by each micro-batch's
    groups, the mean of unequal micro-batches' means is not the groups' mean."""
    fixed = _train(tmp_path, "fixed", [])
    packed = _train(tmp_path, "budget", ["data.packing=true", "data.packed_multiple=8",
                                         "data.tokens_per_micro_batch=1664"])
    assert len(fixed) == len(packed) == 3
    assert [r["micro_batches"] for r in fixed] == [4, 4, 4]
    assert 3 in [r["micro_batches"] for r in packed]
    for a, b in zip(fixed, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6)
    assert torch.tensor([r["micro_batches"] for r in packed]).lt(4).all()
