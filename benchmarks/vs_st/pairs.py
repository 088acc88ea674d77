"""The same training groups and the same tokens for both tools.

The groups are drawn once with megarank's own GroupDataset and GroupSampler and handed to
sentence-transformers in megarank's order. Queries are pre-cut to megarank's query length for
sentence-transformers, and every pair is checked to tokenize to the same ids in both tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megarank.data.groups import Group, GroupDataset
from megarank.data.sampler import GroupSampler
from megarank.data.triplets import read_triplets


def write_triplets(out: Path, sources: list[Path]) -> Path:
    """The training triplets as one JSONL file (what megarank reads): ``sources`` joined."""
    path = out / "train_triplets.jsonl"
    lines = []
    for src in sources:
        text = src.read_text(encoding="utf-8")
        lines += [line for line in text.splitlines() if line.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def materialise_groups(train_path: Path, group_size: int, groups_per_step: int, steps: int,
                       seed: int) -> tuple[list[list[Group]], int]:
    """(the groups megarank consumes, step by step, in its order; groups per epoch).

    megarank's sampler maps global stream positions to groups; every micro-step of every DP rank
    takes consecutive positions, so optimizer step s is positions [s*B, (s+1)*B) for any dp_size
    and micro-batch split. One rank with micro_batch_size = B yields exactly one step per item.
    """
    dataset = GroupDataset(read_triplets(train_path), group_size, seed)
    sampler = iter(GroupSampler(len(dataset), groups_per_step, dp_rank=0, dp_size=1, seed=seed))
    return [[dataset[i, e] for i, e in next(sampler)] for _ in range(steps)], len(dataset)


def dp_order_matches(num_groups: int, groups_per_step: int, steps: int, seed: int) -> bool:
    """Whether megarank's tp1 layout (2 DP ranks, groups_per_step / 2 groups each, as
    megarank.training.setup.build_data builds its samplers) covers each step with exactly the
    (index, epoch) pairs of the one-rank stream that materialise_groups hands over."""
    one = iter(GroupSampler(num_groups, groups_per_step, dp_rank=0, dp_size=1, seed=seed))
    ranks = [iter(GroupSampler(num_groups, groups_per_step // 2, dp_rank=r, dp_size=2, seed=seed))
             for r in (0, 1)]
    return all(sorted(next(one)) == sorted(next(ranks[0]) + next(ranks[1])) for _ in range(steps))


def cut_query(tokenizer: Any, query: str, max_tokens: int) -> str:
    """``query`` cut after its first ``max_tokens`` tokens, as megarank's collator cuts it.

    Cut at the end offset of the last kept token: WordPiece is greedy longest-match, so the
    prefix re-tokenizes to the same tokens (count_token_mismatches checks it on every pair).
    """
    if len(tokenizer(query, add_special_tokens=False)["input_ids"]) <= max_tokens:
        return query
    enc = tokenizer(query, add_special_tokens=False, truncation=True, max_length=max_tokens,
                    return_offsets_mapping=True)
    return query[: enc["offset_mapping"][-1][1]]


def write_st_groups(path: Path, groups: list[list[Group]], tokenizer: Any,
                    max_query_length: int) -> None:
    """The groups as sentence-transformers' worker reads them: one line per group, step order,
    queries pre-cut."""
    with path.open("w", encoding="utf-8") as f:
        for step, step_groups in enumerate(groups, start=1):
            for g in step_groups:
                f.write(json.dumps({"step": step, "record": g.record_index,
                                    "query": cut_query(tokenizer, g.query, max_query_length),
                                    "docs": list(g.docs), "teacher": g.teacher}) + "\n")


def count_token_mismatches(model: Any, collator: Any, ours: list[tuple[str, str]],
                           theirs: list[tuple[str, str]], chunk: int = 256) -> int:
    """Pairs whose ids or token types differ: megarank's collator on ``ours`` vs the
    CrossEncoder's own preprocess on ``theirs`` (the same pairs, queries pre-cut)."""
    import torch

    bad = 0
    for i in range(0, len(ours), chunk):
        a = collator.encode_pairs(ours[i:i + chunk])
        b = model.preprocess(theirs[i:i + chunk])
        for row in range(len(a.input_ids)):
            n, m = int(a.attention_mask[row].sum()), int(b["attention_mask"][row].sum())
            bad += not (n == m and torch.equal(a.input_ids[row, :n], b["input_ids"][row, :m])
                        and torch.equal(a.token_type_ids[row, :n], b["token_type_ids"][row, :m]))
    return bad
