"""A collator for a pair format given field by field, as the ``pair`` config group gives it."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from megarank.config.schema import PairConfig
from megarank.data.collate import PairCollator
from megarank.data.contract import make_contract

FAMILY = {"encoder": "bert", "decoder": "gpt"}

# Pairs of uneven lengths (a padded micro-batch of them holds padding): the packing and
# pooled-layer tests' micro-batch.
UNEVEN_QUERIES = ["what is lift",
                  "boundary layer transition on a flat plate at high mach numbers", "heat"]
UNEVEN_DOCS = [
    "lift is the force on a wing",
    "the boundary layer of a flat plate becomes turbulent at a reynolds number that depends "
    "on the free stream turbulence, the mach number and the wall temperature ratio",
    "heat transfer",
    "a short note",
    "supersonic flow over a cone with an attached shock wave, computed by the method of "
    "characteristics and compared with experiments in a wind tunnel",
    "drag",
]



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
