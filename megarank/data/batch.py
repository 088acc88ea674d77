"""What a micro-batch of (query, document) pairs is, right-padded or packed, and the padding
that makes one from assembled rows. The pairs' tokens come from megarank.data.templates (how a
pair is written) and megarank.data.truncation (how much of it is kept); megarank.data.packing
lays a padded batch end to end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import numpy as np
import torch

POOLINGS = ("cls", "last")


@dataclass
class PackedPairs:
    """Where each pair of a packed row starts and ends; megatron passes it through its layers as
    ``packed_seq_params`` (``qkv_format`` "sbhd": the row keeps its batch dimension of 1, so
    megatron applies RoPE and calls the core attention unchanged)."""

    cu_seqlens: torch.Tensor
    """[S + 1] int32: segment boundaries in the row (the pairs, then a padding segment when the
    row was rounded up)."""
    max_seqlen: int
    """The longest segment, in tokens (a host int: no device sync to read it)."""
    position_ids: torch.Tensor
    """[1, T] long: each token's position inside its own pair."""
    gather_index: torch.Tensor
    """[S, L] long (L = max_seqlen): the row position of segment s's j-th token; T (one past the
    row) where segment s is shorter than j + 1. Used by the unpacked attention path."""
    key_mask: torch.Tensor
    """[S, L] bool: True on the real tokens of ``gather_index``."""
    scatter_index: torch.Tensor
    """[T] long: each row position's place in the flattened [S * L] layout (the inverse of
    ``gather_index``)."""
    segment_lengths: tuple[int, ...] = ()
    """The segments' lengths on the host (FLOP accounting reads these, not a tensor)."""
    qkv_format: str = "sbhd"

    @property
    def num_segments(self) -> int:
        return self.gather_index.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedPairs:
        """A copy with every tensor on ``device``."""
        return each_tensor(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedPairs:
        """A copy in page-locked host memory (for asynchronous copies to the GPU)."""
        return each_tensor(self, torch.Tensor.pin_memory)


@dataclass
class PairBatch:
    """One micro-batch of (query, document) sequences, right-padded."""

    input_ids: torch.Tensor
    """[N, T] long; N = D = groups * group_size documents, row-major by group (group 0's docs
    first), unless ``windows`` maps documents to several rows each."""
    attention_mask: torch.Tensor
    """[N, T] long; 1 on real tokens, 0 on padding."""
    token_type_ids: torch.Tensor
    """[N, T] long; 0 query segment, 1 document segment (all 0 for decoders and padding)."""
    pool_index: torch.Tensor
    """[N] long; the position scored: 0 (``cls`` pooling) or the last real token (``last``)."""
    group_size: int
    """Documents per query; rows [g * group_size, (g + 1) * group_size) belong to group g."""
    num_real_tokens: int
    """attention_mask.sum(), for tokens-per-second accounting."""
    teacher_scores: torch.Tensor | None = None
    """[D] float32 teacher scores of the documents (distillation), or None unless every group
    has them."""
    windows: torch.Tensor | None = None
    """MaxP: [D, K] long, the rows holding each document's windows (-1 past its last), so a
    document's score is its best window's (:func:`max_over_windows`); N rows then, not D. None:
    one row a document (N = D = groups * group_size)."""
    packed: PackedPairs | None = None
    """Padding-free layout (megarank.data.packing): the N rows laid end to end in ONE row of
    ``input_ids`` [1, T], ``pool_index`` positions in that row, attention kept inside each pair
    by these segment boundaries. None: right-padded rows."""

    @property
    def num_rows(self) -> int:
        """Sequences (pairs, or MaxP windows) in the micro-batch, packed or not."""
        return self.pool_index.shape[0]

    def pin_memory(self) -> PairBatch:
        """A copy in page-locked host memory, so ``to(cuda, non_blocking=True)`` overlaps."""
        return each_tensor(self, torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """A copy with every tensor moved to ``device``."""
        return each_tensor(self, lambda t: t.to(device, non_blocking=non_blocking))


def each_tensor(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of a batch dataclass with ``fn`` applied to each tensor field, and to those of
    a nested batch (a PairBatch's ``packed``); None and host values stay as they are."""
    changed = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changed[f.name] = fn(value)
        elif is_dataclass(value):
            changed[f.name] = each_tensor(value, fn)
    return replace(batch, **changed)


def pad_rows(rows: list[tuple[list[int], list[int]]], group_size: int, *, pad_id: int,
             multiple: int, pooling: str) -> PairBatch:
    """Right-pad assembled (ids, token types) rows into a PairBatch, the width rounded up to
    ``multiple``; each row is scored at position 0 (``cls``) or its last real token (``last``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)  # [N]
    width = -(-int(lengths.max()) // multiple) * multiple
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # [N, T]
    token_types = np.zeros((len(rows), width), dtype=np.int64)  # [N, T]
    for i, (ids, types) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        token_types[i, : len(types)] = types
    # Right padding: real tokens are the first `length` positions of each row.
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    if pooling == "cls":
        pool_index = np.zeros(len(rows), dtype=np.int64)
    else:
        pool_index = lengths - 1
    return PairBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        token_type_ids=torch.from_numpy(token_types),
        pool_index=torch.from_numpy(pool_index),
        group_size=group_size,
        num_real_tokens=int(lengths.sum()),
    )
