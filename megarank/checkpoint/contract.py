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
    """``[CLS] query [SEP] document [SEP]`` (encoders) or the decoder prompt template."""
    prompt_template: str | None
    max_length: int
    max_query_length: int
    truncation: str
    padding_side: str
    pad_token_id: int | None
    yes_token_id: int | None
    no_token_id: int | None

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps(asdict(self), indent=2)


# The token each family's HF architecture scores: BERT's pooler reads [CLS] (position 0);
# *ForSequenceClassification decoders and Qwen3-Reranker read the last real token.
POOLING = {"bert": "cls", "gpt": "last"}


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
    yes = no = None
    if cfg.task.head == "yes_no":
        yes, no = answer_token_ids(tokenizer, cfg.task)
    return ScoringContract(
        format=FORMAT, family=cfg.model.family, head=cfg.task.head,
        pooling=POOLING[cfg.model.family],
        pair_format="template" if decoder else "[CLS] query [SEP] document [SEP]",
        prompt_template=cfg.model.prompt_template if decoder else None,
        max_length=cfg.data.max_length, max_query_length=cfg.data.max_query_length,
        truncation="query to max_query_length, then the document to fit max_length",
        padding_side="right",
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        yes_token_id=yes, no_token_id=no,
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
    if contract.prompt_template is not None:
        cfg.model.prompt_template = contract.prompt_template


def read_contract(directory: str | Path) -> ScoringContract:
    """Read and check ``scoring.json`` from ``directory``."""
    path = Path(directory) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scoring contract (not a megarank export/checkpoint?)")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return ScoringContract(**data)
