"""Training groups: one positive and (group_size - 1) negatives for one query.

A group is a pure function of (record, seed, epoch, index): every rank, every restart and every
data-parallel layout forms the same group for the same sample, so resuming from a checkpoint
replays exactly the negatives the uninterrupted run would have seen. Randomness comes from a
local numpy Generator seeded by those numbers, never from the global RNG (which model init,
dropout and other libraries also draw from).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megarank.data.triplets import TripletRecord

# Leading word of every group seed, so that group draws and the sampler's epoch permutations
# (seeded from the same user seed) come from unrelated streams.
_GROUP_STREAM = 0x67726F75  # "grou"

# One warning per process about records with too few negatives: per-record warnings would
# print thousands of lines on a large set with a big group size.
_short_negatives_warned = False


def reset_short_negatives_warning() -> None:
    """Forget that the short-negatives warning was issued, so the next short record warns again."""
    global _short_negatives_warned
    _short_negatives_warned = False


def _warn_short_once(message: str) -> None:
    """Issue `message` as a UserWarning unless a short-negatives warning was already issued."""
    global _short_negatives_warned
    if not _short_negatives_warned:
        _short_negatives_warned = True
        warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class Group:
    """The documents scored together for one query (one softmax row of the listwise loss)."""

    query: str
    """The query text."""
    docs: tuple[str, ...]
    """group_size documents: docs[0] is the positive, docs[1:] the negatives."""
    record_index: int
    """Index of the source record in the list read by `read_triplets`."""
    teacher: tuple[float, ...] | None = None
    """Teacher scores of `docs` (from the record's pos_scores/neg_scores) for distillation;
    None when the record has none."""
    instruction: str | None = None
    """The record's instruction (chat prompts' {instruction}); None: the task's default."""


def _check_group_size(group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def check_records(records: Sequence[TripletRecord], group_size: int) -> int:
    """Check up front that every record can form a group; return how many are short of negatives.

    Call once after reading: it fails before training starts (not at step 40,000) on a record with
    no negatives, and issues the once-per-process warning with the total count of records that
    have fewer than group_size - 1 negatives (those are sampled with replacement).

    Raises:
        ValueError: group_size < 1, or a record has no negatives while group_size > 1.
    """
    _check_group_size(group_size)
    need = group_size - 1
    if need == 0:
        return 0
    short = 0
    for record in records:
        if not record.neg:
            raise ValueError(
                f"{record.source}: record has no negatives, cannot form a group of "
                f"group_size={group_size}"
            )
        short += len(record.neg) < need
    if short:
        _warn_short_once(
            f"{short} of {len(records)} records have fewer than group_size - 1 = {need} negatives; "
            "their negatives are sampled with replacement"
        )
    return short


def _sample_negatives(rng: np.random.Generator, num_neg: int, need: int) -> np.ndarray:
    """Indices of `need` of `num_neg` negatives: distinct when possible, else repeated evenly."""
    if num_neg >= need:
        return rng.choice(num_neg, size=need, replace=False)
    # Too few: like FlagEmbedding, draw without replacement from ceil(need/num_neg) copies of the
    # list. Every negative then appears at least once (only ceil-1 copies could be left out, and
    # (ceil - 1) * num_neg < need), and none more than ceil times, unlike plain i.i.d. draws.
    copies = -(-need // num_neg)
    pool = np.tile(np.arange(num_neg), copies)
    return pool[rng.choice(pool.size, size=need, replace=False)]


def draw_group(num_pos: int, num_neg: int, index: int, group_size: int, seed: int,
               epoch: int) -> tuple[int, np.ndarray]:
    """Which positive and which negatives sample (`index`, `epoch`) takes: (positive index,
    [group_size - 1] negative indices). The one definition of a group's draw, shared by text
    records (`make_group`) and prepared datasets (megarank.data.prepared), so both give the
    same groups for the same seed."""
    rng = np.random.default_rng([_GROUP_STREAM, seed, epoch, index])
    p = int(rng.integers(num_pos))
    need = group_size - 1
    if not need:
        return p, np.zeros(0, dtype=np.int64)
    return p, _sample_negatives(rng, num_neg, need)


def make_group(record: TripletRecord, index: int, group_size: int, seed: int, epoch: int) -> Group:
    """Form the group of `record` for sample (`index`, `epoch`), deterministically.

    The positive is drawn among `record.pos`; the group_size - 1 negatives are drawn without
    replacement, or with repetition (every negative used at least once) when the record has fewer
    than group_size - 1, which issues one warning per process (see `check_records` for a count).

    Args:
        record: the source record.
        index: the record's index in the dataset (part of the seed).
        group_size: documents per group, >= 1; 1 gives just the positive.
        seed: the run's data seed, >= 0.
        epoch: the pass over the data (0-based); a new epoch draws new negatives.

    Raises:
        ValueError: group_size < 1, negative seed/index/epoch, or no negatives while group_size > 1.
    """
    _check_group_size(group_size)
    for name, value in (("seed", seed), ("index", index), ("epoch", epoch)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not record.pos:
        raise ValueError(f"{record.source}: record has no positives")
    need = group_size - 1
    if need and not record.neg:
        raise ValueError(
            f"{record.source}: record has no negatives, cannot form a group of "
            f"group_size={group_size}"
        )
    if need and len(record.neg) < need:
        _warn_short_once(
            f"{record.source}: {len(record.neg)} negatives for group_size - 1 = {need}; "
            "sampling with replacement (warned once per process; check_records counts them all)"
        )
    p, picked = draw_group(len(record.pos), len(record.neg), index, group_size, seed, epoch)
    positive = record.pos[p]
    negatives = tuple(record.neg[int(i)] for i in picked)
    teacher = None
    if record.pos_scores is not None and (record.neg_scores is not None or not need):
        negative_scores = record.neg_scores or ()
        teacher = (record.pos_scores[p], *(negative_scores[int(i)] for i in picked))
    return Group(query=record.query, docs=(positive, *negatives), record_index=index,
                 teacher=teacher, instruction=record.instruction)


class GroupDataset:
    """Records plus a group size and seed: `dataset[index, epoch]` is that sample's Group."""

    def __init__(self, records: Sequence[TripletRecord], group_size: int, seed: int) -> None:
        """Check every record once (see `check_records`) and keep them for group formation."""
        if not records:
            raise ValueError("records is empty")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_short = check_records(records, group_size)
        self.records = records
        self.group_size = group_size
        self.seed = seed

    def __len__(self) -> int:
        """Number of records (= groups per epoch)."""
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> Group:
        """The group of record `index` in `epoch`; key = (index, epoch) as the sampler yields."""
        index, epoch = key
        return make_group(self.records[index], index, self.group_size, self.seed, epoch)
