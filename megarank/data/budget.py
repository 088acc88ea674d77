"""Micro-batches sized by tokens (``data.tokens_per_micro_batch``) instead of by groups.

A step's groups on one data-parallel rank are collated once, right-padded, then cut, in order
and with every group kept whole, into micro-batches that each hold at most a token budget: the
packed row's width when the model reads packed rows (``data.packing``), else rows x the padded
width. Short pairs then fill a micro-batch with more groups than long ones, so every forward
pass is about as large as the device can take, whatever the length mix; the number of
micro-batches varies from step to step. The training step weighs each micro-batch's loss by its
share of the step's groups (megarank.training.step), so the gradient is the mean over the
step's groups exactly as with fixed micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from megarank.data.batch import PairBatch
from megarank.data.packing import packed_width


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def num_groups(batch: PairBatch) -> int:
    """Query groups in a right-padded or packed batch."""
    docs = batch.num_rows if batch.windows is None else batch.windows.shape[0]
    return docs // batch.group_size


def group_rows(batch: PairBatch) -> list[tuple[int, int]]:
    """[start, end) of each group's rows in a right-padded batch (MaxP: its documents' windows,
    which the collator lays out document after document)."""
    g = batch.group_size
    if batch.windows is None:
        return [(i * g, (i + 1) * g) for i in range(num_groups(batch))]
    out = []
    for i in range(num_groups(batch)):
        slots = batch.windows[i * g:(i + 1) * g]
        rows = slots[slots >= 0]
        start, end = int(rows.min()), int(rows.max()) + 1
        if end - start != rows.numel():
            raise ValueError(f"group {i}'s windows are not contiguous rows")
        out.append((start, end))
    return out


def slice_groups(batch: PairBatch, first: int, last: int, pad_multiple: int) -> PairBatch:
    """Groups [first, last) of a right-padded batch, its width cut to their longest row
    (rounded up to ``pad_multiple``, never past the batch's)."""
    if batch.packed is not None:
        raise ValueError("slice the right-padded batch, before it is packed")
    spans = group_rows(batch)
    r0, r1 = spans[first][0], spans[last - 1][1]
    mask = batch.attention_mask[r0:r1]
    width = min(_round_up(int(mask.sum(dim=1).max()), pad_multiple), mask.shape[1])
    g = batch.group_size
    d0, d1 = first * g, last * g
    return replace(
        batch,
        input_ids=batch.input_ids[r0:r1, :width].contiguous(),
        attention_mask=mask[:, :width].contiguous(),
        token_type_ids=batch.token_type_ids[r0:r1, :width].contiguous(),
        pool_index=batch.pool_index[r0:r1].clone(),
        num_real_tokens=int(mask.sum()),
        teacher_scores=None if batch.teacher_scores is None
        else batch.teacher_scores[d0:d1].clone(),
        windows=None if batch.windows is None
        else torch.where(batch.windows[d0:d1] >= 0, batch.windows[d0:d1] - r0,
                         batch.windows[d0:d1]),
    )


def micro_batch_tokens(lengths: list[int], pad_multiple: int, packed_multiple: int | None) -> int:
    """Tokens the model computes for rows of ``lengths`` real tokens: the packed row's width
    (``packed_multiple`` set), else rows x the padded width."""
    if packed_multiple is not None:
        return packed_width(sum(lengths), packed_multiple)
    return len(lengths) * _round_up(max(lengths), pad_multiple)


def split_by_tokens(batch: PairBatch, budget: int, pad_multiple: int,
                    packed_multiple: int | None) -> list[PairBatch]:
    """A right-padded step batch cut into micro-batches of whole groups, in order, each of at
    most ``budget`` tokens (:func:`micro_batch_tokens`). A group that alone exceeds the budget
    is an error naming ``data.tokens_per_micro_batch`` (config validation rules it out)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    parts, first, held = [], 0, []
    for i, (r0, r1) in enumerate(group_rows(batch)):
        rows = lengths[r0:r1]
        if micro_batch_tokens(rows, pad_multiple, packed_multiple) > budget:
            raise ValueError(
                f"a group of {r1 - r0} rows needs "
                f"{micro_batch_tokens(rows, pad_multiple, packed_multiple)} tokens, more than "
                f"data.tokens_per_micro_batch ({budget})")
        if held and micro_batch_tokens(held + rows, pad_multiple, packed_multiple) > budget:
            parts.append(slice_groups(batch, first, i, pad_multiple))
            first, held = i, []
        held = held + rows
    parts.append(slice_groups(batch, first, num_groups(batch), pad_multiple))
    return parts


def length_passes(lengths: Sequence[int], *, max_tokens: int | None = None,
                  max_rows: int | None = None, pad_multiple: int = 1) -> list[list[int]]:
    """Row indices sorted by length (longest first, ties in order) and cut into forward passes,
    each as many rows as fit ``max_tokens`` padded tokens (rows x the pass's longest row rounded
    up to ``pad_multiple``) and at most ``max_rows``; at least one row a pass. Scoring (serving,
    evaluation) goes through this so that short pairs are not padded to long ones."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    i = 0
    while i < len(order):
        rows = len(order) - i
        if max_tokens is not None:
            rows = min(rows, max(1, max_tokens // _round_up(lengths[order[i]], pad_multiple)))
        if max_rows is not None:
            rows = min(rows, max_rows)
        passes.append(order[i:i + rows])
        i += rows
    return passes


def gather_rows(rows: Sequence[tuple[PairBatch, int, int]], pad_id: int,
                pad_multiple: int = 1) -> PairBatch:
    """One right-padded batch (group size 1) of ``(batch, row, length)`` rows taken from
    right-padded batches: each row's real tokens, token types and pooled position as its collator
    made them, the width their longest row's rounded up to ``pad_multiple``."""
    width = _round_up(max(length for _, _, length in rows), pad_multiple)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    token_types = torch.zeros((n, width), dtype=torch.long)
    pool_index = torch.empty(n, dtype=torch.long)
    lens = torch.empty(n, dtype=torch.long)
    for i, (batch, r, length) in enumerate(rows):
        input_ids[i, :length] = batch.input_ids[r, :length]
        token_types[i, :length] = batch.token_type_ids[r, :length]
        pool_index[i] = batch.pool_index[r]
        lens[i] = length
    attention_mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    return PairBatch(input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=token_types, pool_index=pool_index, group_size=1,
                     num_real_tokens=int(lens.sum()))
