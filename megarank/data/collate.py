"""Turn groups (or arbitrary query/document pairs) into the token tensors a cross-encoder reads,
as a scoring contract says.

The collator puts three jobs together, each in its own module: how a pair is written
(megarank.data.templates: the tokenizer's pair template for encoders, a text template or a chat
prompt for decoders), how much of it is kept (megarank.data.truncation: the query to
max_query_length, then the document to fit max_length, or MaxP windows), and padding
(megarank.data.batch: rows right-padded to a multiple, or megarank.data.packing: end to end).
What the model scores (the layout, the pooled token, the lengths) comes from the contract alone;
from the run's config come only the padding multiple, packing and MaxP training's windows, which
change no score.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from megarank.data.batch import PairBatch, pad_rows
from megarank.data.contract import ScoringContract
from megarank.data.groups import Group
from megarank.data.packing import pack_batch
from megarank.data.templates import ChatTemplate, distinct, pair_template
from megarank.data.truncation import Truncation

Pair = tuple[str, str] | tuple[str, str, str | None]
"""(query, document) or (query, document, instruction); None: the contract's instruction."""


class PairCollator:
    """Tokenize, truncate and pad (query, document) pairs into a PairBatch."""

    def __init__(self, tokenizer: Any, contract: ScoringContract, *, pad_to_multiple_of: int = 1,
                 train_windows: int = 1, window_stride: int | None = None,
                 packed_multiple: int | None = None) -> None:
        """Pairs as ``contract`` writes them, with ``tokenizer`` (a Hugging Face fast tokenizer).

        Args:
            pad_to_multiple_of: pad the batch width up to a multiple of this (e.g. 8 for tensor
                cores, or the tensor-parallel size for sequence parallelism); contract.max_length
                must be a multiple of it, so padding never goes past it.
            train_windows: MaxP at training: a training group's document is read as up to this
                many windows (its first ones; see :meth:`encode_windows`); 1: FirstP.
            window_stride: MaxP: tokens between window starts; None: half a window.
            packed_multiple: padding-free batches for the model (``data.packing``): what
                :meth:`model_layout` makes of a batch, its pairs end to end in one row rounded
                up to this many tokens; None: right-padded rows.
        """
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if contract.max_length % pad_to_multiple_of:
            raise ValueError(f"max_length ({contract.max_length}) must be a multiple of "
                             f"pad_to_multiple_of ({pad_to_multiple_of})")
        if packed_multiple is not None and packed_multiple < 1:
            raise ValueError(f"packed_multiple must be >= 1, got {packed_multiple}")
        self.tokenizer, self.contract = tokenizer, contract
        self.template = pair_template(tokenizer, contract)
        if train_windows > 1 and self.template.whole:
            raise ValueError("MaxP windows need query and document tokenized apart; a chat "
                             "prompt tokenizes each pair whole")
        self.truncation = Truncation(
            tokenizer, max_length=contract.max_length, max_query_length=contract.max_query_length,
            fixed=self.template.fixed, train_windows=train_windows, window_stride=window_stride)
        self.pad_to_multiple_of, self.packed_multiple = pad_to_multiple_of, packed_multiple
        self.pad_id = self.template.pad_id

    @property
    def kind(self) -> str:
        """``encoder`` (the tokenizer's pair template) or ``decoder`` (a text template)."""
        return "decoder" if self.contract.family == "gpt" else "encoder"

    @property
    def max_length(self) -> int:
        return self.contract.max_length

    @property
    def max_query_length(self) -> int:
        return self.contract.max_query_length

    @property
    def train_windows(self) -> int:
        return self.truncation.train_windows

    @property
    def pretokenizable(self) -> bool:
        """Whether queries and documents are tokenized apart (encoder and plain decoder
        layouts), so each text's ids can be computed once and stored (``megarank prepare``).
        The chat layout tokenizes each pair's text whole and is not."""
        return not self.template.whole

    def tokenize_queries(self, queries: Sequence[str]) -> list[list[int]]:
        """Each query's ids as a pair holds them (megarank.data.truncation)."""
        return self.truncation.tokenize_queries(queries)

    def tokenize_documents(self, docs: Sequence[str]) -> list[list[int]]:
        """Each document's ids, cut to the most a pair (or MaxP training's windows) holds."""
        return self.truncation.tokenize_documents(docs)

    def model_layout(self, batch: PairBatch) -> PairBatch:
        """``batch`` as the model reads it: packed (megarank.data.packing) when this collator
        packs, else as it is. Encoding stays padded, so batching by rows and lengths (serving's
        batcher) works on rows; what goes into the model goes through here."""
        if self.packed_multiple is None:
            return batch
        return pack_batch(batch, self.packed_multiple)

    def _pad(self, rows: list[tuple[list[int], list[int]]], group_size: int) -> PairBatch:
        return pad_rows(rows, group_size, pad_id=self.pad_id, multiple=self.pad_to_multiple_of,
                        pooling=self.contract.pooling)

    def _chat_rows(self, queries: Sequence[str], docs: Sequence[str],
                   query_of_row: Sequence[int],
                   instructions: Sequence[str | None]) -> list[tuple[list[int], list[int]]]:
        """Chat layout: prefix + the pair text (one tokenization, cut at its end) + suffix."""
        assert isinstance(self.template, ChatTemplate)
        cut = self.truncation.cut_query_texts(queries)
        texts = [self.template.fill(cut[q], d, instruction)
                 for q, d, instruction in zip(query_of_row, docs, instructions, strict=True)]
        return [self.template.wrap(ids) for ids in self.truncation.cut_pair_texts(texts)]

    def _encode(self, queries: Sequence[str], docs: Sequence[str], query_of_row: Sequence[int],
                group_size: int, instructions: Sequence[str | None] | None = None) -> PairBatch:
        """Encode rows whose query is queries[query_of_row[i]] and document docs[i]
        (instructions[i]: chat layout only)."""
        if self.template.whole:
            rows = self._chat_rows(queries, docs, query_of_row,
                                   instructions or [None] * len(docs))
            return self._pad(rows, group_size)
        return self.encode_tokens(self.tokenize_queries(queries), self.tokenize_documents(docs),
                                  query_of_row, group_size)

    def encode_tokens(self, query_ids: Sequence[Sequence[int]], doc_ids: Sequence[Sequence[int]],
                      query_of_row: Sequence[int], group_size: int,
                      teacher: Sequence[float] | None = None) -> PairBatch:
        """The batch of rows whose query is query_ids[query_of_row[i]] and document doc_ids[i],
        from ids of `tokenize_queries` / `tokenize_documents` (text pairs go through the same
        assembly); ``teacher``: the rows' teacher scores."""
        if self.template.whole:
            raise ValueError("the chat layout tokenizes each pair whole: encode its texts")
        rows = []
        for q, d in zip(query_of_row, doc_ids, strict=True):
            query = list(query_ids[q])
            rows.append(self.template.assemble(query, self.truncation.fit_document(query,
                                                                                   list(d))))
        batch = self._pad(rows, group_size)
        if teacher is not None:
            batch = replace(batch, teacher_scores=torch.tensor(teacher, dtype=torch.float32))
        return batch

    def encode_windows(self, query_ids: Sequence[Sequence[int]],
                       doc_ids: Sequence[Sequence[int]], query_of_row: Sequence[int],
                       group_size: int, teacher: Sequence[float] | None = None,
                       max_windows: int | None = None) -> PairBatch:
        """As :meth:`encode_tokens`, each document read as its windows (MaxP,
        megarank.data.truncation.Truncation.window_rows): a row per window, and ``windows``
        saying whose."""
        row_query, row_ids, slots = self.truncation.window_rows(query_ids, doc_ids,
                                                                query_of_row, max_windows)
        batch = self.encode_tokens(query_ids, row_ids, row_query, group_size, teacher)
        return replace(batch, windows=slots)

    def pair_windows(self, pairs: Sequence[Pair],
                     ) -> tuple[list[list[int]], list[int], list[list[int]], torch.Tensor]:
        """MaxP rows of (query, document) pairs, every window of each uncut document a row: the
        distinct queries' ids, each row's query (an index into them) and window ids, and the
        [P, K] rows of each pair (-1 past its last), for :meth:`encode_tokens`."""
        if not pairs:
            raise ValueError("cannot encode an empty list of pairs")
        if not self.pretokenizable:
            raise ValueError("MaxP windows need query and document tokenized apart; a chat "
                             "prompt tokenizes each pair whole")
        queries, query_of_pair = distinct([p[0] for p in pairs])
        query_ids = self.tokenize_queries(queries)
        row_query, row_ids, slots = self.truncation.window_rows(
            query_ids, self.truncation.full_documents([p[1] for p in pairs]), query_of_pair)
        return query_ids, row_query, row_ids, slots

    def encode_pair_windows(self, pairs: Sequence[Pair]) -> PairBatch:
        """:meth:`encode_pairs` under MaxP: every window of each (uncut) document a row."""
        query_ids, row_query, row_ids, slots = self.pair_windows(pairs)
        return replace(self.encode_tokens(query_ids, row_ids, row_query, 1), windows=slots)

    def token_settings(self) -> dict[str, Any]:
        """What decides the ids of `tokenize_queries` / `tokenize_documents`: the tokenizer
        (name, class, size and a hash of its full definition) and the truncation settings. A
        prepared dataset records this and is refused by a collator whose settings differ; the
        name (the path it was read from) is information only, so the same tokenizer files read
        from another directory are the same tokenizer."""
        size = len(self.tokenizer)
        # The hash serialises the whole vocabulary (~0.3 s for 30k entries): once per collator,
        # again only if tokens were added since.
        cached = getattr(self, "_tokenizer_sha256", None)
        if cached is None or cached[0] != size:
            self._tokenizer_sha256 = cached = (size, self._tokenizer_definition_sha256())
        return {
            "tokenizer": str(getattr(self.tokenizer, "name_or_path", "")),
            "tokenizer_class": type(self.tokenizer).__name__,
            "tokenizer_size": size,
            "tokenizer_sha256": cached[1],
            "kind": self.kind,
            "template": self.template.text,
            "max_length": self.max_length,
            "max_query_length": self.max_query_length,
            "document_tokens": self.truncation.document_tokens,
        }

    def _tokenizer_definition_sha256(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            # Truncation and padding are call-time state (this collator changes them per call).
            spec.pop("truncation", None)
            spec.pop("padding", None)
            text = json.dumps(spec, sort_keys=True)
        else:
            text = json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def __call__(self, groups: list[Group]) -> PairBatch:
        """Collate one micro-batch of groups; all must have the same number of documents."""
        if not groups:
            raise ValueError("cannot collate an empty list of groups")
        group_size = len(groups[0].docs)
        for g in groups:
            if len(g.docs) != group_size:
                raise ValueError(
                    f"groups must share one size: record {g.record_index} has {len(g.docs)} "
                    f"documents, record {groups[0].record_index} has {group_size}"
                )
        # Each query is tokenized once per group, not once per document.
        docs = [d for g in groups for d in g.docs]
        query_of_row = [i for i in range(len(groups)) for _ in range(group_size)]
        instructions = [g.instruction for g in groups for _ in range(group_size)]
        batch = self._encode([g.query for g in groups], docs, query_of_row, group_size,
                             instructions)
        # Scores only when every group has them: a loss that needs them checks every record at
        # start (training/setup.build_data); one that does not ignores them.
        if all(g.teacher is not None for g in groups):
            teacher = [s for g in groups for s in g.teacher]
            batch = replace(batch, teacher_scores=torch.tensor(teacher, dtype=torch.float32))
        return batch

    def encode_pairs(self, pairs: Sequence[Pair]) -> PairBatch:
        """Encode arbitrary (query, document) pairs (evaluation); group_size is 1. A third
        element is the pair's instruction (chat layout; None: the collator's)."""
        if not pairs:
            raise ValueError("cannot encode an empty list of pairs")
        # Reranking evaluation scores many candidates per query: tokenize each query once.
        queries, query_of_row = distinct([p[0] for p in pairs])
        docs = [p[1] for p in pairs]
        instructions = [p[2] if len(p) > 2 else None for p in pairs]
        if any(i is not None for i in instructions) and not self.template.whole:
            raise ValueError("pairs carry instructions, but this model's prompt has no "
                             "{instruction} (only a chat prompt, e.g. pair=qwen3_reranker, does)")
        return self._encode(queries, docs, query_of_row, 1, instructions)
