"""megarank: distributed reranker (cross-encoder) training on megatron-core.

The Python API (see megarank/api.py): :func:`train_model`, :func:`load_scorer` (a
:class:`Scorer`), :func:`convert_from_hf`, :func:`convert_to_hf`, :func:`evaluate_model` (and
:func:`evaluate_tasks` for several collections with the model built once, their tasks read by
:func:`rerank_task`), :func:`mine_triplets` and :func:`compose_config`. They load on first
use, so ``import megarank`` stays light.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

__all__ = ["Scorer", "compare_runs", "compose_config", "convert_from_hf", "convert_to_hf",
           "evaluate_model", "evaluate_tasks", "load_scorer", "mine_triplets", "rerank_task",
           "train_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megarank import api

        return getattr(api, name)
    raise AttributeError(f"module 'megarank' has no attribute {name!r}")


class _EagerMegatronFusersOnCPU(importlib.abc.MetaPathFinder):
    """megatron-core wraps its fusable functions (bias-GeLU, bias-dropout-add, ...) in
    ``torch.compile`` as they are defined, at import: ~3.4 s of every process's start here
    (torch's dynamo and inductor imported, 38 functions wrapped), where a CPU run calls none of
    them (megarank turns megatron's fusions off without CUDA) and inductor would need a C++
    compiler if it did. Where torch sees no CUDA device, megatron's own
    ``megatron.core.jit.disable_jit_fuser`` is called as that module loads, before any module
    takes ``jit_fuser`` from it, so the functions stay plain. With CUDA nothing changes."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != "megatron.core.jit":
            return None
        import torch  # megatron.core has imported it by now

        if torch.cuda.is_available():
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DisablingLoader(spec.loader)
        return spec


class _DisablingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.loader.exec_module(module)
        module.disable_jit_fuser()


if "megatron.core.jit" not in sys.modules:
    sys.meta_path.insert(0, _EagerMegatronFusersOnCPU())
