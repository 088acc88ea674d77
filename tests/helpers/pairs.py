"""A collator for a pair format given field by field, as the ``pair`` config group gives it."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from megarank.config.schema import PairConfig
from megarank.data.collate import PairCollator
from megarank.data.contract import make_contract

FAMILY = {"encoder": "bert", "decoder": "gpt"}


def pair_collator(tokenizer: Any, kind: str, *, max_length: int, max_query_length: int,
                  template: str | None = None, prefix: str | None = None, suffix: str = "",
                  instruction: str | None = None, head: str = "classifier",
                  **options: Any) -> PairCollator:
    """The collator of a ``kind`` (encoder/decoder) model whose pair format has these fields
    (the rest PairConfig's defaults); ``options``: PairCollator's padding, packing and MaxP."""
    pair = OmegaConf.structured(PairConfig(
        head=head, max_length=max_length, max_query_length=max_query_length, prefix=prefix,
        suffix=suffix, instruction=instruction,
        **({} if template is None else {"template": template})))
    return PairCollator(tokenizer, make_contract(pair, FAMILY[kind], tokenizer), **options)
