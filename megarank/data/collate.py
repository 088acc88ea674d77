"""Turn groups (or arbitrary query/document pairs) into padded token tensors for the cross-encoder.

Three layouts:
- "encoder" (BERT-like): the tokenizer's own pair template, e.g. ``[CLS] q [SEP] d [SEP]`` with
  token types 0 / 1; the pooled position is 0 ([CLS]).
- "decoder" (GPT-like): a text template with ``{query}`` and ``{document}``, BOS in front when the
  tokenizer has one, no CLS/SEP, token types all 0; the pooled position is the last real token.
- "decoder" with a chat prompt (``prefix`` set; Qwen3-Reranker): ``prefix + pair + suffix``,
  where the prefix (system turn, start of the user turn) and the suffix (end of the user turn,
  the assistant's opening) are tokenized on their own and never cut, and the pair text, the
  template with ``{instruction}``, ``{query}`` and ``{document}`` filled in, is tokenized as ONE
  text and cut at its end to fit max_length. This is the Qwen3-Reranker model card's rule, token
  for token; no BOS (the prefix is the whole start).

Truncation cuts the query to max_query_length tokens, then cuts the DOCUMENT so the whole
sequence fits max_length; special tokens and template text are never cut. Queries, documents and
template pieces are tokenized separately (one batched fast-tokenizer call per piece, on the
training hot path) and the ids concatenated, so truncation is exact in tokens. For BPE tokenizers
the tokens at a piece boundary may differ from tokenizing the joined string; for the encoder
layout the result equals ``tokenizer(q, d)`` whenever nothing is truncated. (The chat layout
tokenizes its pair text whole, as the model it reproduces was trained; a query longer than
max_query_length is cut as text, at the end of its last kept token.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megarank.config.validate import chat_template_problem
from megarank.data.groups import Group

if TYPE_CHECKING:
    from megarank.data.packing import PackedPairs

DEFAULT_DECODER_TEMPLATE = "Query: {query}\nDocument: {document}\nRelevant:"
"""The decoder prompt used when `template` is None."""

Pair = tuple[str, str] | tuple[str, str, str | None]
"""(query, document) or (query, document, instruction); None: the collator's instruction."""

_KINDS = ("encoder", "decoder")
_POOLINGS = ("cls", "last")


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
        return replace(
            self, input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            token_type_ids=self.token_type_ids.pin_memory(),
            pool_index=self.pool_index.pin_memory(),
            teacher_scores=None if self.teacher_scores is None
            else self.teacher_scores.pin_memory(),
            windows=None if self.windows is None else self.windows.pin_memory(),
            packed=None if self.packed is None else self.packed.pin_memory(),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """A copy with every tensor moved to `device`."""
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
            token_type_ids=self.token_type_ids.to(device, non_blocking=non_blocking),
            pool_index=self.pool_index.to(device, non_blocking=non_blocking),
            teacher_scores=None if self.teacher_scores is None
            else self.teacher_scores.to(device, non_blocking=non_blocking),
            windows=None if self.windows is None
            else self.windows.to(device, non_blocking=non_blocking),
            packed=None if self.packed is None
            else self.packed.to(device, non_blocking=non_blocking),
        )


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


@dataclass(frozen=True)
class _PairLayout:
    """Where the tokenizer's pair template puts special tokens: prefix A middle B suffix."""

    prefix: tuple[list[int], list[int]]  # (ids, token types)
    middle: tuple[list[int], list[int]]
    suffix: tuple[list[int], list[int]]
    a_type: int
    b_type: int

    @property
    def num_special(self) -> int:
        return len(self.prefix[0]) + len(self.middle[0]) + len(self.suffix[0])

    def build(self, a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        """(ids, token types) of the pair a, b."""
        ids = self.prefix[0] + a + self.middle[0] + b + self.suffix[0]
        types = (
            self.prefix[1]
            + [self.a_type] * len(a)
            + self.middle[1]
            + [self.b_type] * len(b)
            + self.suffix[1]
        )
        return ids, types


def _derive_pair_layout(tokenizer) -> _PairLayout:
    """Read the pair template off the tokenizer by encoding a probe pair, then self-check it.

    Works for any tokenizer whose template is specials, A, specials, B, specials (BERT, RoBERTa,
    XLM-R, ...); transformers 5 fast tokenizers have no build_inputs_with_special_tokens.
    """

    def plain(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    a, b = plain("query"), plain("document")
    enc = tokenizer(
        "query", "document", return_special_tokens_mask=True, return_token_type_ids=True
    )
    ids, types, special = enc["input_ids"], enc["token_type_ids"], enc["special_tokens_mask"]
    i = 0
    while i < len(ids) and special[i]:
        i += 1
    p = i
    j = p + len(a)
    while j < len(ids) and special[j]:
        j += 1
    k = j + len(b)
    if ids[p : p + len(a)] != a or ids[j:k] != b or not all(special[k:]):
        raise ValueError(f"cannot read the pair template of {type(tokenizer).__name__}: {ids}")
    layout = _PairLayout(
        prefix=(ids[:p], types[:p]),
        middle=(ids[p + len(a) : j], types[p + len(a) : j]),
        suffix=(ids[k:], types[k:]),
        a_type=types[p] if a else 0,
        b_type=types[j] if b else 0,
    )
    q, d = "what is a probe query?", "A probe document, with punctuation."
    ref = tokenizer(q, d, return_token_type_ids=True)
    if layout.build(plain(q), plain(d)) != (ref["input_ids"], ref["token_type_ids"]):
        raise ValueError(
            f"pair template of {type(tokenizer).__name__} is not prefix-A-mid-B-suffix"
        )
    return layout


def check_chat_template(template: str) -> None:
    """Raise ValueError unless ``template`` is a valid chat pair template (see
    megarank.config.validate.chat_template_problem)."""
    problem = chat_template_problem(template)
    if problem:
        raise ValueError(problem)


def _split_template(template: str) -> tuple[list[str], list[str]]:
    """Split a template into its literal pieces and the placeholder order between them.

    "Q: {query} D: {document}!" -> (["Q: ", " D: ", "!"], ["query", "document"]).
    """
    for name in ("{query}", "{document}"):
        if template.count(name) != 1:
            raise ValueError(f"template must contain {name} exactly once: {template!r}")
    q, d = template.index("{query}"), template.index("{document}")
    first, second = ("{query}", "{document}") if q < d else ("{document}", "{query}")
    head, rest = template.split(first)
    middle, tail = rest.split(second)
    return [head, middle, tail], [first[1:-1], second[1:-1]]


class PairCollator:
    """Tokenize, truncate and pad (query, document) pairs into a PairBatch."""

    def __init__(
        self,
        tokenizer,
        *,
        kind: str,
        max_length: int,
        max_query_length: int,
        template: str | None = None,
        pad_to_multiple_of: int = 1,
        pooling: str | None = None,
        prefix: str | None = None,
        suffix: str = "",
        instruction: str | None = None,
        train_windows: int = 1,
        window_stride: int | None = None,
        packed_multiple: int | None = None,
    ) -> None:
        """Configure the collator.

        Args:
            tokenizer: a Hugging Face fast tokenizer (transformers.AutoTokenizer).
            kind: "encoder" (tokenizer pair template) or "decoder" (text template).
            max_length: most tokens per sequence, specials and template included; a multiple of
                pad_to_multiple_of so padding never goes past it.
            max_query_length: most tokens of query text (specials/template not counted).
            template: decoder prompt with {query} and {document}; default
                DEFAULT_DECODER_TEMPLATE. Must be None for encoders.
            pad_to_multiple_of: pad the batch width up to a multiple of this (e.g. 8 for tensor
                cores, or the tensor-parallel size for sequence parallelism).
            pooling: the position the head scores, ``cls`` (0) or ``last`` (the last real
                token); None: ``cls`` for encoders, ``last`` for decoders. A scoring contract's
                ``pooling`` is passed here, so the contract decides what is scored.
            prefix: decoders: a chat prompt's text before the pair (e.g. Qwen3-Reranker's system
                turn and ``<|im_start|>user\n``); setting it selects the chat layout, in which
                ``template`` is the pair text (with ``{instruction}``, ``{query}``,
                ``{document}``) tokenized whole.
            suffix: chat layout: the text after the pair (``<|im_end|>\n<|im_start|>assistant``
                ...), never cut.
            instruction: chat layout: the ``{instruction}`` of pairs that bring none.
            train_windows: MaxP at training: a training group's document is read as up to this
                many windows (its first ones; see :meth:`encode_windows`), so
                :meth:`tokenize_documents` keeps enough of it; 1: its first window (FirstP).
            window_stride: MaxP: tokens between window starts; None: half a window.
            packed_multiple: padding-free batches for the model (``data.packing``): what
                :meth:`model_layout` makes of a batch, its pairs end to end in one row rounded
                up to this many tokens; None: right-padded rows.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if kind == "encoder" and (template is not None or prefix is not None):
            raise ValueError("template and prefix are only used with kind='decoder'")
        pooling = pooling or ("cls" if kind == "encoder" else "last")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if max_query_length < 1:
            raise ValueError(f"max_query_length must be >= 1, got {max_query_length}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if train_windows < 1:
            raise ValueError(f"train_windows must be >= 1, got {train_windows}")
        if window_stride is not None and window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {window_stride}")
        if train_windows > 1 and prefix is not None:
            raise ValueError("MaxP windows need query and document tokenized apart; a chat "
                             "prompt tokenizes each pair whole")
        self.train_windows, self.window_stride = train_windows, window_stride
        if packed_multiple is not None and packed_multiple < 1:
            raise ValueError(f"packed_multiple must be >= 1, got {packed_multiple}")
        self.packed_multiple = packed_multiple
        if max_length % pad_to_multiple_of:
            raise ValueError(
                f"max_length ({max_length}) must be a multiple of pad_to_multiple_of "
                f"({pad_to_multiple_of})"
            )
        self.tokenizer = tokenizer
        self.kind = kind
        self.pooling = pooling
        self.max_length = max_length
        self.max_query_length = max_query_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.template = None
        self.chat = prefix is not None
        self.instruction = instruction
        if kind == "encoder":
            self._layout = _derive_pair_layout(tokenizer)
            fixed = self._layout.num_special
            pad_id = tokenizer.pad_token_id
        elif self.chat:
            if template is None:
                raise ValueError("a chat prompt (prefix) needs its pair template")
            check_chat_template(template)
            self.template = template
            self._prefix = self._plain([prefix])[0] if prefix else []
            self._suffix = self._plain([suffix])[0] if suffix else []
            fixed = len(self._prefix) + len(self._suffix)
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                pad_id = tokenizer.eos_token_id
        else:
            self.template = DEFAULT_DECODER_TEMPLATE if template is None else template
            pieces, self._order = _split_template(self.template)
            self._pieces = [self._plain([p])[0] if p else [] for p in pieces]
            bos = tokenizer.bos_token_id
            self._bos = [] if bos is None else [bos]
            fixed = len(self._bos) + sum(len(p) for p in self._pieces)
            # Most decoder tokenizers (Llama, Qwen) ship without a pad token; padded positions
            # are masked out, so any valid id works and EOS is the usual choice.
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                pad_id = tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad_token_id to pad with")
        self.pad_id = int(pad_id)
        # Document tokens available when the query is as long as allowed; at least one so a
        # document is never cut to nothing by configuration.
        if max_length - fixed - max_query_length < 1:
            raise ValueError(
                f"max_length ({max_length}) leaves no room for a document after max_query_length "
                f"({max_query_length}) and {fixed} special/template tokens"
            )
        self._fixed = fixed
        # The most document tokens any pair holds (a query of 0 tokens); MaxP training reads up
        # to train_windows windows of that size, each a stride after the last.
        budget = max_length - fixed
        self.document_tokens = budget + (train_windows - 1) * self.stride_for(budget)

    def model_layout(self, batch: PairBatch) -> PairBatch:
        """``batch`` as the model reads it: packed (megarank.data.packing) when this collator
        packs, else as it is. Encoding stays padded, so batching by rows and lengths (serving's
        batcher) works on rows; what goes into the model goes through here."""
        if self.packed_multiple is None:
            return batch
        from megarank.data.packing import pack_batch

        return pack_batch(batch, self.packed_multiple)

    def _plain(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of `texts` without special tokens, cut to `max_tokens` (one batched call)."""
        if max_tokens is None:
            return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        # Truncating inside the tokenizer keeps long documents cheap and avoids its
        # "longer than the maximum sequence length" warning.
        out = self.tokenizer(
            list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens
        )
        return out["input_ids"]

    def _assemble(self, query: list[int], doc: list[int]) -> tuple[list[int], list[int]]:
        """(ids, token types) of one sequence; `doc` is cut to fit max_length."""
        doc = doc[: self.max_length - self._fixed - len(query)]
        if self.kind == "encoder":
            return self._layout.build(query, doc)
        parts = {"query": query, "document": doc}
        ids = self._bos + self._pieces[0] + parts[self._order[0]] + self._pieces[1]
        ids = ids + parts[self._order[1]] + self._pieces[2]
        return ids, [0] * len(ids)

    def _cut_queries(self, queries: Sequence[str]) -> list[str]:
        """Chat layout: each query as text, cut after its max_query_length-th token."""
        enc = self.tokenizer(list(queries), add_special_tokens=False,
                             return_offsets_mapping=True)
        return [q if len(offsets) <= self.max_query_length else
                q[: offsets[self.max_query_length - 1][1]]
                for q, offsets in zip(queries, enc["offset_mapping"], strict=True)]

    def _chat_rows(self, queries: Sequence[str], docs: Sequence[str],
                   query_of_row: Sequence[int],
                   instructions: Sequence[str | None]) -> list[tuple[list[int], list[int]]]:
        """Chat layout: prefix + the pair text (one tokenization, cut at its end) + suffix."""
        cut = self._cut_queries(queries)
        texts = []
        for q, d, instruction in zip(query_of_row, docs, instructions, strict=True):
            if instruction is None:
                instruction = self.instruction
            if instruction is None and "{instruction}" in self.template:
                raise ValueError("the chat template has {instruction} but neither the pair nor "
                                 "the collator gives one")
            texts.append(self.template.format(instruction=instruction, query=cut[q],
                                              document=d))
        budget = self.max_length - self._fixed
        if getattr(self.tokenizer, "truncation_side", "right") == "right":
            pair_ids = self._plain(texts, budget)
        else:  # the rule cuts the END of the pair text, whatever the tokenizer's default
            pair_ids = [ids[:budget] for ids in self._plain(texts)]
        rows = []
        for p in pair_ids:
            ids = self._prefix + p + self._suffix
            rows.append((ids, [0] * len(ids)))
        return rows

    def _encode(
        self,
        queries: Sequence[str],
        docs: Sequence[str],
        query_of_row: Sequence[int],
        group_size: int,
        instructions: Sequence[str | None] | None = None,
    ) -> PairBatch:
        """Encode rows whose query is queries[query_of_row[i]] and document docs[i]
        (instructions[i]: chat layout only)."""
        if self.chat:
            rows = self._chat_rows(queries, docs, query_of_row,
                                   instructions or [None] * len(docs))
        else:
            return self.encode_tokens(self.tokenize_queries(queries),
                                      self.tokenize_documents(docs), query_of_row, group_size)
        return self._pad(rows, group_size)

    @property
    def pretokenizable(self) -> bool:
        """Whether queries and documents are tokenized apart (encoder and plain decoder
        layouts), so each text's ids can be computed once and stored (``megarank prepare``).
        The chat layout tokenizes each pair's text whole and is not."""
        return not self.chat

    def tokenize_queries(self, queries: Sequence[str]) -> list[list[int]]:
        """Each query's ids as a pair holds them: no specials, cut to max_query_length."""
        return self._plain(queries, self.max_query_length)

    def tokenize_documents(self, docs: Sequence[str]) -> list[list[int]]:
        """Each document's ids, cut to the most any pair can hold (the query may be as short as
        0 tokens), or under MaxP training to what its first ``train_windows`` windows cover; a
        pair cuts them further to fit its query."""
        return self._plain(docs, self.document_tokens)

    def full_documents(self, docs: Sequence[str]) -> list[list[int]]:
        """Each document's ids, uncut (for MaxP windows)."""
        return self._plain(docs)

    def document_budget(self, query_ids: Sequence[int]) -> int:
        """The most document tokens a pair with this query holds."""
        return self.max_length - self._fixed - len(query_ids)

    def stride_for(self, size: int) -> int:
        """MaxP: tokens between the starts of windows of ``size`` tokens (window_stride, else
        half a window)."""
        return self.window_stride or max(1, size // 2)

    def window_rows(self, query_ids: Sequence[Sequence[int]], doc_ids: Sequence[Sequence[int]],
                    query_of_row: Sequence[int], max_windows: int | None = None,
                    ) -> tuple[list[int], list[list[int]], torch.Tensor]:
        """MaxP: document i (ids ``doc_ids[i]``, query ``query_ids[query_of_row[i]]``) cut into
        windows of the most tokens a pair with its query holds, one every :meth:`stride_for`
        tokens, its first ``max_windows`` of them (None: all). Returns the query of
        each row, the window ids of each row, and the [D, K] rows of each document (-1 past its
        last)."""
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

    def encode_windows(self, query_ids: Sequence[Sequence[int]],
                       doc_ids: Sequence[Sequence[int]], query_of_row: Sequence[int],
                       group_size: int, teacher: Sequence[float] | None = None,
                       max_windows: int | None = None) -> PairBatch:
        """As :meth:`encode_tokens`, each document read as its windows (:meth:`window_rows`):
        a row per window, and ``windows`` saying whose (MaxP)."""
        row_query, row_ids, slots = self.window_rows(query_ids, doc_ids, query_of_row,
                                                     max_windows)
        batch = self.encode_tokens(query_ids, row_ids, row_query, group_size, teacher)
        return replace(batch, windows=slots)

    def encode_pair_windows(self, pairs: Sequence[Pair]) -> PairBatch:
        """:meth:`encode_pairs` under MaxP: every window of each (uncut) document a row."""
        if not pairs:
            raise ValueError("cannot encode an empty list of pairs")
        if not self.pretokenizable:
            raise ValueError("MaxP windows need query and document tokenized apart; a chat "
                             "prompt tokenizes each pair whole")
        query_slot: dict[str, int] = {}
        query_of_row = [query_slot.setdefault(p[0], len(query_slot)) for p in pairs]
        return self.encode_windows(self.tokenize_queries(list(query_slot)),
                                   self.full_documents([p[1] for p in pairs]), query_of_row, 1)

    def token_settings(self) -> dict[str, Any]:
        """What decides the ids of `tokenize_queries` / `tokenize_documents`: the tokenizer
        (name, class, size and a hash of its full definition) and the truncation settings. A
        prepared dataset records this and is refused by a collator whose settings differ; the
        name (the path it was read from) is information only, so the same tokenizer files read
        from another directory are the same tokenizer."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            # Truncation and padding are call-time state (this collator changes them per call).
            spec.pop("truncation", None)
            spec.pop("padding", None)
            text = json.dumps(spec, sort_keys=True)
        else:
            text = json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return {
            "tokenizer": str(getattr(self.tokenizer, "name_or_path", "")),
            "tokenizer_class": type(self.tokenizer).__name__,
            "tokenizer_size": len(self.tokenizer),
            "tokenizer_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "kind": self.kind,
            "template": self.template,
            "max_length": self.max_length,
            "max_query_length": self.max_query_length,
            "document_tokens": self.document_tokens,
        }

    def encode_tokens(self, query_ids: Sequence[Sequence[int]], doc_ids: Sequence[Sequence[int]],
                      query_of_row: Sequence[int], group_size: int,
                      teacher: Sequence[float] | None = None) -> PairBatch:
        """The batch of rows whose query is query_ids[query_of_row[i]] and document doc_ids[i],
        from ids of `tokenize_queries` / `tokenize_documents` (text pairs go through the same
        assembly); ``teacher``: the rows' teacher scores."""
        if self.chat:
            raise ValueError("the chat layout tokenizes each pair whole: encode its texts")
        rows = [self._assemble(list(query_ids[q]), list(d))
                for q, d in zip(query_of_row, doc_ids, strict=True)]
        batch = self._pad(rows, group_size)
        if teacher is not None:
            batch = replace(batch, teacher_scores=torch.tensor(teacher, dtype=torch.float32))
        return batch

    def _pad(self, rows: list[tuple[list[int], list[int]]], group_size: int) -> PairBatch:
        """Right-pad assembled (ids, token types) rows into a PairBatch."""
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)  # [N]
        multiple = self.pad_to_multiple_of
        width = -(-int(lengths.max()) // multiple) * multiple
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # [N, T]
        token_types = np.zeros((len(rows), width), dtype=np.int64)  # [N, T]
        for i, (ids, types) in enumerate(rows):
            input_ids[i, : len(ids)] = ids
            token_types[i, : len(types)] = types
        # Right padding: real tokens are the first `length` positions of each row.
        attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        if self.pooling == "cls":
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
        query_slot: dict[str, int] = {}
        query_of_row = [query_slot.setdefault(p[0], len(query_slot)) for p in pairs]
        docs = [p[1] for p in pairs]
        instructions = [p[2] if len(p) > 2 else None for p in pairs]
        if any(i is not None for i in instructions) and not self.chat:
            raise ValueError("pairs carry instructions, but this model's prompt has no "
                             "{instruction} (only a chat prompt, e.g. task=qwen3_reranker, does)")
        return self._encode(list(query_slot), docs, query_of_row, 1, instructions)
