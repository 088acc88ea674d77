"""This process's place in a job: the one place megarank reads torchrun's ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``, and asks a process group for a rank and size.

Torch-free, so a command can ask whether it is rank 0 (to print, to write a file) before
anything heavy is imported or any process group exists. A plain ``python -m ...`` process has
none of the variables: rank 0, local rank 0, a world of one. Process groups are made and owned
in :mod:`megarank.parallel.runtime`.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _read(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name} ({value!r}) must be an integer, as "
                         "torchrun sets it") from None


def env_rank() -> int:
    """Global rank: torchrun's ``RANK``, 0 for a plain process."""
    return _read("RANK", 0)


def env_local_rank() -> int:
    """Rank on this node (the GPU a CUDA process takes): ``LOCAL_RANK``, 0 for a plain process."""
    return _read("LOCAL_RANK", 0)


def env_world_size(default: int = 1) -> int:
    """Ranks in the job: torchrun's ``WORLD_SIZE``; ``default`` (1) for a plain process (the plan
    passes 0 to fall back to its layout's own size)."""
    return _read("WORLD_SIZE", default)


def launched_by_torchrun() -> bool:
    """Whether the launcher set ``RANK`` (a rendezvous to join), not a plain process."""
    return "RANK" in os.environ


def is_main_process() -> bool:
    """Global rank 0: the process that prints and writes a command's files."""
    return env_rank() == 0


def group_rank_and_size(group: Any = None) -> tuple[int, int]:
    """(rank, size) of this process in ``group`` (default: the whole world) once a process group
    is up; (0, 1) without one, a process on its own. Imports no torch: a process that never
    imported ``torch.distributed`` has no group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1
