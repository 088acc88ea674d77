"""Padding-free micro-batches: a micro-batch's pairs laid end to end in one row.

A right-padded micro-batch of N pairs is [N, T_max]; most rows carry padding that every linear
layer, norm and MLP still computes. Packed, the same pairs are one row of sum(len_i) tokens
(rounded up to ``multiple``, the remainder one padding segment), and attention is kept inside each
pair by the segment boundaries (``cu_seqlens``): each pair sees exactly the tokens it saw padded,
its positions restart at 0 (or the model's position offset), and its score is read at its own
pooled token. Scores, losses and gradients equal the padded batch's.

How attention honours the boundaries is the attention module's business (megarank.models
.attention): flash varlen attention on CUDA, or on any device an exact "unpack": the packed
tokens gathered into a [segments, longest] layout for one batched SDPA call and gathered back,
so only attention (not the linears, norms and MLPs) sees padding.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megarank.data.batch import PackedPairs, PairBatch


def packed_width(num_tokens: int, multiple: int) -> int:
    """The row width of ``num_tokens`` packed tokens: rounded up to ``multiple``."""
    return -(-num_tokens // multiple) * multiple


def pack_lengths(lengths: torch.Tensor, width: int) -> PackedPairs:
    """The segment layout of pairs of ``lengths`` tokens laid end to end in a row of ``width``
    (>= their sum) tokens; what is left over is one padding segment."""
    lengths = lengths.to(torch.long)
    total = int(lengths.sum())
    if width < total:
        raise ValueError(f"a packed row of {width} tokens cannot hold {total}")
    seg = lengths if width == total else torch.cat([lengths, lengths.new_tensor([width - total])])
    cu = torch.zeros(len(seg) + 1, dtype=torch.long)
    torch.cumsum(seg, 0, out=cu[1:])
    longest = int(seg.max())
    starts = cu[:-1]
    # Position of every row token inside its segment.
    owner = torch.repeat_interleave(torch.arange(len(seg)), seg)  # [T]
    within = torch.arange(width) - starts[owner]
    j = torch.arange(longest)
    key_mask = j[None, :] < seg[:, None]  # [S, L]
    gather_index = torch.where(key_mask, starts[:, None] + j[None, :], torch.tensor(width))
    return PackedPairs(
        cu_seqlens=cu.to(torch.int32), max_seqlen=longest, position_ids=within[None, :],
        gather_index=gather_index, key_mask=key_mask, scatter_index=owner * longest + within,
        segment_lengths=tuple(seg.tolist()),
    )


def pack_batch(batch: PairBatch, multiple: int = 64) -> PairBatch:
    """The packed form of a right-padded PairBatch: its rows' real tokens end to end in one row
    of sum(lengths) tokens rounded up to ``multiple``; pool_index becomes each pair's pooled
    token's position in that row. Teacher scores, group size and MaxP windows are unchanged
    (a row stays a row, now a segment)."""
    if batch.packed is not None:
        return batch
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    mask = batch.attention_mask.bool()
    lengths = mask.sum(dim=1)
    width = packed_width(int(lengths.sum()), multiple)
    layout = pack_lengths(lengths, width)
    real = int(lengths.sum())
    pad_id = batch.input_ids[~mask][:1]
    fill = int(pad_id) if pad_id.numel() else 0
    ids = torch.full((1, width), fill, dtype=batch.input_ids.dtype)
    types = torch.zeros((1, width), dtype=batch.token_type_ids.dtype)
    ids[0, :real] = batch.input_ids[mask]
    types[0, :real] = batch.token_type_ids[mask]
    attention = torch.zeros((1, width), dtype=batch.attention_mask.dtype)
    attention[0, :real] = 1
    starts = layout.cu_seqlens[: len(lengths)].to(torch.long)
    return replace(batch, input_ids=ids, attention_mask=attention, token_type_ids=types,
                   pool_index=starts + batch.pool_index, packed=layout)
