"""How much of a pair is kept: the query cut to max_query_length tokens, then the document cut
so the whole sequence fits max_length (template and special tokens are never cut); or, under
MaxP, the document read as windows of what a pair holds.

Queries and documents are tokenized apart (one batched fast-tokenizer call per list, on the
training hot path), so truncation is exact in tokens. A chat prompt tokenizes each pair's text
whole: there the query is cut as text (at the end of its last kept token) and the pair text at
its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megarank.data.templates import plain_ids, tokenize


def windows(ids: list[int], size: int, stride: int) -> list[list[int]]:
    """``ids`` cut into windows of ``size`` tokens, one starting every ``stride`` tokens, the
    last one ending at the end (one window, possibly empty, when ``ids`` fits)."""
    if len(ids) <= size:
        return [ids]
    starts = list(range(0, len(ids) - size + 1, stride))
    if starts[-1] + size < len(ids):
        starts.append(len(ids) - size)
    return [ids[s:s + size] for s in starts]


def max_over_windows(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[D] each document's best window score (MaxP), from [N] row ``scores`` and the [D, K]
    ``slots`` of a PairBatch's ``windows`` (-1: no window). Differentiable: the gradient goes to
    the best window (split evenly between tied ones)."""
    padded = torch.cat([scores, scores.new_full((1,), float("-inf"))])  # slot -1 reads -inf
    return padded[slots].amax(dim=1)


class Truncation:
    """The lengths of a pair format applied to token ids (and, for chat prompts, to text)."""

    def __init__(self, tokenizer: Any, *, max_length: int, max_query_length: int, fixed: int,
                 train_windows: int = 1, window_stride: int | None = None) -> None:
        """``fixed``: the tokens the template adds to every pair. ``train_windows``: MaxP at
        training, a document is read as up to this many windows (its first ones), so
        :meth:`tokenize_documents` keeps enough of it; 1: its first window (FirstP).
        ``window_stride``: MaxP, tokens between window starts; None: half a window."""
        if max_query_length < 1:
            raise ValueError(f"max_query_length must be >= 1, got {max_query_length}")
        if train_windows < 1:
            raise ValueError(f"train_windows must be >= 1, got {train_windows}")
        if window_stride is not None and window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {window_stride}")
        # At least one document token when the query is as long as allowed, so a document is
        # never cut to nothing by configuration.
        if max_length - fixed - max_query_length < 1:
            raise ValueError(
                f"max_length ({max_length}) leaves no room for a document after max_query_length "
                f"({max_query_length}) and {fixed} special/template tokens")
        self.tokenizer = tokenizer
        self.max_length, self.max_query_length, self.fixed = max_length, max_query_length, fixed
        self.train_windows, self.window_stride = train_windows, window_stride
        # The most document tokens any pair holds (a query of 0 tokens); MaxP training reads up
        # to train_windows windows of that size, each a stride after the last.
        budget = max_length - fixed
        self.document_tokens = budget + (train_windows - 1) * self.stride_for(budget)

    def tokenize_queries(self, queries: Sequence[str]) -> list[list[int]]:
        """Each query's ids as a pair holds them: no specials, cut to max_query_length."""
        return plain_ids(self.tokenizer, queries, self.max_query_length)

    def tokenize_documents(self, docs: Sequence[str]) -> list[list[int]]:
        """Each document's ids, cut to the most any pair can hold (the query may be as short as
        0 tokens), or under MaxP training to what its first ``train_windows`` windows cover; a
        pair cuts them further to fit its query."""
        return plain_ids(self.tokenizer, docs, self.document_tokens)

    def full_documents(self, docs: Sequence[str]) -> list[list[int]]:
        """Each document's ids, uncut (for MaxP windows)."""
        return plain_ids(self.tokenizer, docs)

    def document_budget(self, query_ids: Sequence[int]) -> int:
        """The most document tokens a pair with this query holds."""
        return self.max_length - self.fixed - len(query_ids)

    def fit_document(self, query_ids: Sequence[int], doc_ids: list[int]) -> list[int]:
        """``doc_ids`` cut to what a pair with this query holds."""
        return doc_ids[: self.document_budget(query_ids)]

    def stride_for(self, size: int) -> int:
        """MaxP: tokens between the starts of windows of ``size`` tokens (window_stride, else
        half a window)."""
        return self.window_stride or max(1, size // 2)

    def window_rows(self, query_ids: Sequence[Sequence[int]], doc_ids: Sequence[Sequence[int]],
                    query_of_row: Sequence[int], max_windows: int | None = None,
                    ) -> tuple[list[int], list[list[int]], torch.Tensor]:
        """MaxP: document i (ids ``doc_ids[i]``, query ``query_ids[query_of_row[i]]``) cut into
        windows of the most tokens a pair with its query holds, one every :meth:`stride_for`
        tokens, its first ``max_windows`` of them (None: all). Returns the query of each row,
        the window ids of each row, and the [D, K] rows of each document (-1 past its last)."""
        row_query: list[int] = []
        row_ids: list[list[int]] = []
        owned: list[range] = []
        for q, doc in zip(query_of_row, doc_ids, strict=True):
            size = self.document_budget(query_ids[q])
            cut = windows(list(doc), size, self.stride_for(size))[:max_windows]
            owned.append(range(len(row_ids), len(row_ids) + len(cut)))
            row_query += [q] * len(cut)
            row_ids += cut
        slots = torch.full((len(owned), max(len(r) for r in owned)), -1, dtype=torch.long)
        for d, r in enumerate(owned):
            slots[d, : len(r)] = torch.tensor(r, dtype=torch.long)
        return row_query, row_ids, slots

    def cut_query_texts(self, queries: Sequence[str]) -> list[str]:
        """Chat prompt: each query as text, cut after its max_query_length-th token."""
        enc = tokenize(self.tokenizer, queries, return_offsets_mapping=True)
        return [q if len(offsets) <= self.max_query_length else
                q[: offsets[self.max_query_length - 1][1]]
                for q, offsets in zip(queries, enc["offset_mapping"], strict=True)]

    def cut_pair_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Chat prompt: each pair text's ids, cut at its END to fit max_length with the prompt,
        whatever the tokenizer's own truncation side."""
        budget = self.max_length - self.fixed
        if getattr(self.tokenizer, "truncation_side", "right") == "right":
            return plain_ids(self.tokenizer, texts, budget)
        return [ids[:budget] for ids in plain_ids(self.tokenizer, texts)]
