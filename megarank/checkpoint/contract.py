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


def answer_token_ids(tokenizer: Any, task: Any) -> tuple[int, int]:
    """The single-token ids of task.yes_token and task.no_token (yes/no head)."""
    ids = []
    for field_name in ("yes_token", "no_token"):
        text = task[field_name]
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"task.{field_name} ({text!r}) must be one token of the tokenizer, "
                             f"got {len(toks)}: {toks}")
        ids.append(toks[0])
    return ids[0], ids[1]


def make_contract(cfg: Any, tokenizer: Any) -> ScoringContract:
    """The contract of a run with this config and tokenizer."""
    decoder = cfg.model.family == "gpt"
    chat = decoder and cfg.task.prompt_prefix is not None
    yes = no = None
    if cfg.task.head == "yes_no":
        yes, no = answer_token_ids(tokenizer, cfg.task)
    pair_format, template = "[CLS] query [SEP] document [SEP]", None
    if chat:
        pair_format, template = "chat", cfg.task.prompt_pair
    elif decoder:
        pair_format, template = "template", cfg.model.prompt_template
    return ScoringContract(
        format=FORMAT, family=cfg.model.family, head=cfg.task.head,
        pooling=POOLING[cfg.model.family], pair_format=pair_format, prompt_template=template,
        max_length=cfg.data.max_length, max_query_length=cfg.data.max_query_length,
        truncation=CHAT_TRUNCATION if chat else
        "query to max_query_length, then the document to fit max_length",
        padding_side="right",
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        yes_token_id=yes, no_token_id=no,
        prompt_prefix=cfg.task.prompt_prefix if chat else None,
        prompt_suffix=cfg.task.prompt_suffix if chat else None,
        instruction=cfg.task.instruction if chat else None,
    )


def write_contract(directory: str | Path, contract: ScoringContract) -> Path:
    """Write ``contract`` as ``scoring.json`` into ``directory``."""
    path = Path(directory) / FILE
    path.write_text(contract.to_json())
    return path


def apply_contract(cfg: Any, contract: ScoringContract) -> None:
    """Set the config fields a saved contract decides (head, lengths, prompt), in place."""
    cfg.task.head = contract.head
    cfg.data.max_length = contract.max_length
    cfg.data.max_query_length = contract.max_query_length
    if contract.pair_format == "chat":
        cfg.task.prompt_prefix = contract.prompt_prefix
        cfg.task.prompt_pair = contract.prompt_template
        cfg.task.prompt_suffix = contract.prompt_suffix
        cfg.task.instruction = contract.instruction
    elif contract.prompt_template is not None:
        cfg.model.prompt_template = contract.prompt_template


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
