"""How a (query, document) pair is written as tokens: the three layouts a scoring contract names.

- ``EncoderTemplate`` (BERT-like): the tokenizer's own pair template, e.g. ``[CLS] q [SEP] d
  [SEP]`` with token types 0 / 1, read off the tokenizer by encoding a probe pair.
- ``DecoderTemplate`` (GPT-like): a text template with ``{query}`` and ``{document}``, BOS in
  front when the tokenizer has one, no CLS/SEP, token types all 0. Its literal pieces are
  tokenized apart and the ids concatenated, so truncation is exact in tokens (for BPE tokenizers
  the tokens at a piece boundary may differ from tokenizing the joined string).
- ``ChatTemplate`` (Qwen3-Reranker): ``prefix + pair + suffix``, the prefix (system turn, start
  of the user turn) and suffix (end of the user turn, the assistant's opening) tokenized on
  their own and never cut, the pair text (the template with ``{instruction}``, ``{query}`` and
  ``{document}`` filled in) tokenized as ONE text, as the model it reproduces was trained; no BOS.

What is cut, and where, is megarank.data.truncation's; padding is megarank.data.batch's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megarank.config.validate import chat_template_problem
from megarank.data.contract import ScoringContract

_TOKENIZER_CALL = threading.Lock()
"""A fast tokenizer's truncation is state its backend keeps between calls: each call sets it
(or clears it) and then encodes, so two threads sharing a tokenizer (serving tokenizes on
several) can encode with each other's limit. Calls that set it hold this lock."""


def tokenize(tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> Any:
    """``tokenizer(texts, add_special_tokens=False, **kwargs)``, one call at a time."""
    with _TOKENIZER_CALL:
        return tokenizer(list(texts), add_special_tokens=False, **kwargs)


def plain_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None,
              ) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens, cut to ``max_tokens`` (one batched call;
    truncating inside the tokenizer keeps long documents cheap and avoids its "longer than the
    maximum sequence length" warning). Safe to call from several threads.

    A text that occurs more than once is tokenized once (reranking scores the same documents
    for many queries: Cranfield's test top 30 holds 3,390 pairs of far fewer documents); every
    occurrence gets its own list."""
    unique, of_text = distinct(texts)
    cut = {} if max_tokens is None else {"truncation": True, "max_length": max_tokens}
    ids = tokenize(tokenizer, unique, **cut)["input_ids"]
    if len(unique) == len(of_text):
        return ids
    return [list(ids[i]) for i in of_text]


def distinct(items: Sequence[str]) -> tuple[list[str], list[int]]:
    """(each distinct item once, in first-seen order; each item's index in that list)."""
    slot: dict[str, int] = {}
    of_item = [slot.setdefault(x, len(slot)) for x in items]
    return list(slot), of_item


def pad_id_of(tokenizer: Any) -> int:
    """The id padded positions hold: the pad token, else EOS (most decoder tokenizers, Llama and
    Qwen, ship without a pad token; padded positions are masked out, so any valid id works)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad_token_id to pad with")
    return int(pad_id)


@dataclass(frozen=True)
class EncoderTemplate:
    """The tokenizer's pair template: prefix A middle B suffix, each with its token types."""

    prefix: tuple[list[int], list[int]]  # (ids, token types)
    middle: tuple[list[int], list[int]]
    suffix: tuple[list[int], list[int]]
    a_type: int
    b_type: int
    pad_id: int

    whole = False
    """Query and document are tokenized apart (and can be prepared once)."""
    text = None
    """No text template: the tokenizer's."""

    @property
    def fixed(self) -> int:
        """Tokens the template adds to a pair."""
        return len(self.prefix[0]) + len(self.middle[0]) + len(self.suffix[0])

    def assemble(self, query: list[int], doc: list[int]) -> tuple[list[int], list[int]]:
        """(ids, token types) of the pair query, doc."""
        ids = self.prefix[0] + query + self.middle[0] + doc + self.suffix[0]
        types = (self.prefix[1] + [self.a_type] * len(query) + self.middle[1]
                 + [self.b_type] * len(doc) + self.suffix[1])
        return ids, types

    @classmethod
    def of(cls, tokenizer: Any) -> EncoderTemplate:
        """Read the pair template off ``tokenizer`` by encoding a probe pair, then self-check it.
        Works for any tokenizer whose template is specials, A, specials, B, specials (BERT,
        RoBERTa, XLM-R, ...); transformers 5 fast tokenizers have no
        build_inputs_with_special_tokens."""
        a, b = plain_ids(tokenizer, ["query", "document"])
        enc = tokenizer("query", "document", return_special_tokens_mask=True,
                        return_token_type_ids=True)
        ids, types, special = enc["input_ids"], enc["token_type_ids"], enc["special_tokens_mask"]
        p = 0
        while p < len(ids) and special[p]:
            p += 1
        j = p + len(a)
        while j < len(ids) and special[j]:
            j += 1
        k = j + len(b)
        if ids[p:p + len(a)] != a or ids[j:k] != b or not all(special[k:]):
            raise ValueError(f"cannot read the pair template of {type(tokenizer).__name__}: {ids}")
        template = cls(prefix=(ids[:p], types[:p]), middle=(ids[p + len(a):j], types[p + len(a):j]),
                       suffix=(ids[k:], types[k:]), a_type=types[p] if a else 0,
                       b_type=types[j] if b else 0, pad_id=pad_id_of(tokenizer))
        q, d = "what is a probe query?", "A probe document, with punctuation."
        ref = tokenizer(q, d, return_token_type_ids=True)
        if template.assemble(*plain_ids(tokenizer, [q, d])) != (ref["input_ids"],
                                                                ref["token_type_ids"]):
            raise ValueError(f"pair template of {type(tokenizer).__name__} is not "
                             "prefix-A-mid-B-suffix")
        return template


def split_template(template: str) -> tuple[list[str], list[str]]:
    """A decoder template's literal pieces and the placeholder order between them:
    "Q: {query} D: {document}!" -> (["Q: ", " D: ", "!"], ["query", "document"])."""
    for name in ("{query}", "{document}"):
        if template.count(name) != 1:
            raise ValueError(f"template must contain {name} exactly once: {template!r}")
    q, d = template.index("{query}"), template.index("{document}")
    first, second = ("{query}", "{document}") if q < d else ("{document}", "{query}")
    head, rest = template.split(first)
    middle, tail = rest.split(second)
    return [head, middle, tail], [first[1:-1], second[1:-1]]


class DecoderTemplate:
    """A text template, its literal pieces tokenized apart, BOS in front when there is one."""

    whole = False

    def __init__(self, tokenizer: Any, text: str) -> None:
        pieces, self.order = split_template(text)
        self.text = text
        self.pieces = [plain_ids(tokenizer, [p])[0] if p else [] for p in pieces]
        bos = tokenizer.bos_token_id
        self.bos = [] if bos is None else [bos]
        self.pad_id = pad_id_of(tokenizer)

    @property
    def fixed(self) -> int:
        """Tokens the template adds to a pair."""
        return len(self.bos) + sum(len(p) for p in self.pieces)

    def assemble(self, query: list[int], doc: list[int]) -> tuple[list[int], list[int]]:
        """(ids, token types) of the pair query, doc: types all 0."""
        parts = {"query": query, "document": doc}
        ids = (self.bos + self.pieces[0] + parts[self.order[0]] + self.pieces[1]
               + parts[self.order[1]] + self.pieces[2])
        return ids, [0] * len(ids)


class ChatTemplate:
    """A chat prompt: prefix and suffix tokenized on their own, the pair text tokenized whole."""

    whole = True
    """Each pair's text is tokenized whole: query and document cannot be prepared apart."""

    def __init__(self, tokenizer: Any, text: str, prefix: str, suffix: str,
                 instruction: str | None) -> None:
        problem = chat_template_problem(text)
        if problem:
            raise ValueError(problem)
        self.text, self.instruction = text, instruction
        self.prefix = plain_ids(tokenizer, [prefix])[0] if prefix else []
        self.suffix = plain_ids(tokenizer, [suffix])[0] if suffix else []
        self.pad_id = pad_id_of(tokenizer)

    @property
    def fixed(self) -> int:
        """Tokens the prompt adds around the pair text."""
        return len(self.prefix) + len(self.suffix)

    def fill(self, query: str, document: str, instruction: str | None) -> str:
        """The pair text; ``instruction`` None: the template's default one."""
        if instruction is None:
            instruction = self.instruction
        if instruction is None and "{instruction}" in self.text:
            raise ValueError("the chat template has {instruction} but neither the pair nor "
                             "pair.instruction gives one")
        return self.text.format(instruction=instruction, query=query, document=document)

    def wrap(self, pair_ids: list[int]) -> tuple[list[int], list[int]]:
        """(ids, token types) of prefix + the pair text's ids + suffix."""
        ids = self.prefix + pair_ids + self.suffix
        return ids, [0] * len(ids)


PairTemplate = EncoderTemplate | DecoderTemplate | ChatTemplate


def pair_template(tokenizer: Any, contract: ScoringContract) -> PairTemplate:
    """The template ``contract`` names, made for ``tokenizer``."""
    if contract.family != "gpt":  # encoders: bert, deberta
        return EncoderTemplate.of(tokenizer)
    if contract.prompt_template is None:
        raise ValueError(f"a {contract.family} scoring contract needs its prompt_template")
    if contract.pair_format == "chat":
        return ChatTemplate(tokenizer, contract.prompt_template, contract.prompt_prefix or "",
                            contract.prompt_suffix or "", contract.instruction)
    return DecoderTemplate(tokenizer, contract.prompt_template)
