"""megarank: distributed reranker (cross-encoder) training on megatron-core.

The Python API (see megarank/api.py): :func:`train_model`, :func:`load_scorer` (a
:class:`Scorer`), :func:`convert_from_hf`, :func:`convert_to_hf`, :func:`evaluate_model`,
:func:`mine_triplets` and :func:`compose_config`. They load on first use, so ``import megarank``
stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Scorer", "compare_runs", "compose_config", "convert_from_hf", "convert_to_hf",
           "evaluate_model", "load_scorer", "mine_triplets", "train_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megarank import api

        return getattr(api, name)
    raise AttributeError(f"module 'megarank' has no attribute {name!r}")
