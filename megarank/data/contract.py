"""The scoring contract: how a saved model turns a (query, document) pair into a score.

Written as ``scoring.json`` beside every checkpoint and Hugging Face export, and read back by
megarank's own scorer, so that training and inference cannot silently disagree on the head, the
pooled token, the prompt, the answer tokens, the lengths or the padding side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE = "scoring.json"
FORMAT = "megarank-scoring/1"


@dataclass(frozen=True)
class ScoringContract:
    """Everything a scorer needs besides the weights and the tokenizer."""

    format: str
    family: str
    """``bert`` (encoder) or ``gpt`` (decoder)."""
    head: str
    """``classifier`` or ``yes_no``."""
    pooling: str
    """``cls`` (position 0) or ``last`` (the last non-padding token)."""
    pair_format: str
    """``[CLS] query [SEP] document [SEP]`` (encoders), ``template`` (a decoder prompt template,
    its pieces tokenized apart) or ``chat`` (prompt_prefix + the pair text tokenized whole +
    prompt_suffix)."""
    prompt_template: str | None
    """The decoder template; for ``chat``, the pair text with {instruction}, {query},
    {document}."""
    max_length: int
    max_query_length: int
    truncation: str
    padding_side: str
    pad_token_id: int | None
    yes_token_id: int | None
    no_token_id: int | None
    prompt_prefix: str | None = None
    """``chat``: the text before the pair, tokenized on its own, never cut."""
    prompt_suffix: str | None = None
    """``chat``: the text after the pair, tokenized on its own, never cut."""
    instruction: str | None = None
    """``chat``: the {instruction} of pairs that bring none."""

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps(asdict(self), indent=2)


# The token each family's HF architecture scores: BERT's pooler reads [CLS] (position 0);
# *ForSequenceClassification decoders and Qwen3-Reranker read the last real token.
POOLING = {"bert": "cls", "deberta": "cls", "gpt": "last"}


CHAT_TRUNCATION = ("query to max_query_length (as text), then the pair text cut at its end to fit "
                   "max_length; prompt_prefix and prompt_suffix are never cut")


def answer_token_ids(tokenizer: Any, pair: Any) -> tuple[int, int]:
    """The single-token ids of pair.yes_token and pair.no_token (yes/no head)."""
    ids = []
    for field_name in ("yes_token", "no_token"):
        text = pair[field_name]
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"pair.{field_name} ({text!r}) must be one token of the tokenizer, "
                             f"got {len(toks)}: {toks}")
        ids.append(toks[0])
    return ids[0], ids[1]


def make_contract(pair: Any, family: str, tokenizer: Any) -> ScoringContract:
    """The contract of the pair format ``pair`` (the config's ``pair`` group) for a model of
    ``family`` with ``tokenizer``: the one place a scoring contract is made."""
    decoder = family == "gpt"
    chat = decoder and pair.prefix is not None
    yes = no = None
    if pair.head == "yes_no":
        yes, no = answer_token_ids(tokenizer, pair)
    pair_format, template = "[CLS] query [SEP] document [SEP]", None
    if chat:
        pair_format, template = "chat", pair.template
    elif decoder:
        pair_format, template = "template", pair.template
    return ScoringContract(
        format=FORMAT, family=family, head=pair.head,
        pooling=POOLING[family], pair_format=pair_format, prompt_template=template,
        max_length=pair.max_length, max_query_length=pair.max_query_length,
        truncation=CHAT_TRUNCATION if chat else
        "query to max_query_length, then the document to fit max_length",
        padding_side="right",
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        yes_token_id=yes, no_token_id=no,
        prompt_prefix=pair.prefix if chat else None,
        prompt_suffix=pair.suffix if chat else None,
        instruction=pair.instruction if chat else None,
    )


def pair_fields(contract: ScoringContract) -> dict[str, Any]:
    """The ``pair`` config fields a saved contract decides (for a model directory that brings
    no megarank config: an HF export); the answer tokens are the tokenizer's texts of its ids
    and are left to the caller."""
    fields: dict[str, Any] = {"head": contract.head, "max_length": contract.max_length,
                              "max_query_length": contract.max_query_length}
    if contract.prompt_template is not None:
        fields["template"] = contract.prompt_template
    if contract.pair_format == "chat":
        fields.update(prefix=contract.prompt_prefix, suffix=contract.prompt_suffix or "",
                      instruction=contract.instruction)
    return fields


# The config field that decides each contract field.
CONFIG_FIELD = {
    "family": "model.family", "pooling": "model.family", "head": "pair.head",
    "pair_format": "pair.prefix", "prompt_template": "pair.template",
    "max_length": "pair.max_length", "max_query_length": "pair.max_query_length",
    "truncation": "pair.prefix", "pad_token_id": "model.tokenizer",
    "yes_token_id": "pair.yes_token", "no_token_id": "pair.no_token",
    "prompt_prefix": "pair.prefix", "prompt_suffix": "pair.suffix",
    "instruction": "pair.instruction",
}


class ContractMismatch(ValueError):
    """The config would score pairs otherwise than a saved model's scoring contract says."""


def check_against(saved: ScoringContract, derived: ScoringContract, where: str) -> None:
    """Raise ContractMismatch, naming each config field and both values, unless the contract the
    config derives equals the saved one (``where``: the saved contract's file)."""
    diffs = [f"{CONFIG_FIELD.get(k, k)}: the config gives {k} {v!r}, {where} says "
             f"{getattr(saved, k)!r}" for k, v in asdict(derived).items()
             if getattr(saved, k) != v]
    if diffs:
        raise ContractMismatch(
            f"{where} does not match how this model would score with this config: "
            + "; ".join(diffs) + ". A saved model scores pairs as its scoring contract says: "
            "drop any override of these fields (to cut pairs shorter when serving, use its "
            "max_length setting)")


def write_contract(directory: str | Path, contract: ScoringContract) -> Path:
    """Write ``contract`` as ``scoring.json`` into ``directory``."""
    path = Path(directory) / FILE
    path.write_text(contract.to_json())
    return path


def read_contract(directory: str | Path) -> ScoringContract:
    """Read and check ``scoring.json`` from ``directory``."""
    path = Path(directory) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scoring contract (not a megarank export/checkpoint?)")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    # An export's notes on how other libraries and servers score it (checkpoint/templates.py): not the contract.
    data.pop("serving", None)
    return ScoringContract(**data)
