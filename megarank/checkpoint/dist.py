"""Distributed checkpoints in megatron's format: save, load, resume, weights-only starts.

Layout of a run directory's ``checkpoints/``::

    step_0000040/      megatron dist checkpoint (model, optimizer, RNG) + common (scheduler,
                       train state) + megarank.json (step, layout, config)
    latest             the name of the newest COMPLETE checkpoint

A checkpoint is written into ``step_N.partial`` and renamed only after every rank has finished
and rank 0 has written ``megarank.json``; ``latest`` is replaced atomically after that. A crash
mid-save leaves a ``.partial`` directory that nothing ever loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megarank.parallel.megatron import (
    optimizer_sharding_metadata,
    prepare_optimizer_for_load,
    separate_adam_steps,
)
from megarank.parallel.runtime import Runtime

META_FILE = "megarank.json"
LATEST = "latest"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside megatron's DDP wrapper (which does not forward sharded_state_dict)."""
    return getattr(model, "module", model)


def _rng_object(rt: Runtime, state: Any) -> ShardedObject:
    # One RNG state per (pp, tp, dp) rank: dropout streams differ by rank and must resume so.
    return ShardedObject(
        "rng_state", state, (rt.pp_size, rt.tp_size, rt.dp_size),
        (rt.pp_rank, rt.tp_rank, rt.dp_rank), replica_id=0,
    )


def _capture_rng(device: torch.device) -> dict[str, Any]:
    # The run's device decides, not the host: a CPU run on a CUDA machine keeps no CUDA RNG state.
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a run's checkpoints/ folder), or None."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"{marker} names {path.name}, which is not a complete megarank checkpoint "
            f"(no {META_FILE})"
        )
    return path


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: Any,
                    scheduler: Any, train_state: dict[str, Any], rt: Runtime,
                    meta: dict[str, Any]) -> Path:
    """Write a complete training checkpoint of ``step`` under ``root``; collective."""
    root = Path(root)
    model_sd = _unwrap(model).sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd,
                                                  metadata=optimizer_sharding_metadata()),
        "rng": _rng_object(rt, _capture_rng(rt.device)),
        "scheduler": scheduler.state_dict(),
        "train_state": dict(train_state),
    }
    final = root / checkpoint_name(step)
    contract = root.parent / "scoring.json"  # the scoring contract travels with every checkpoint
    write_atomically(final, state, {**meta, "step": step, "train_state": dict(train_state)}, rt,
                     extra_files=[contract] if contract.is_file() else [])
    if rt.is_main:
        tmp = root / f"{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
    dist.barrier()
    return final


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, rt: Runtime,
                          meta: dict[str, Any], extra_files: list[Path] = ()) -> Path:
    """Write the model weights alone (e.g. an HF import) as a megarank checkpoint; collective."""
    state = {"model": _unwrap(model).sharded_state_dict()}
    write_atomically(Path(path), state, {**meta, "step": 0, "train_state": None}, rt,
                     extra_files=list(extra_files))
    return Path(path)


def write_atomically(final: Path, state: dict[str, Any], meta: dict[str, Any], rt: Runtime,
                     extra_files: list[Path]) -> None:
    """dist_checkpointing.save into ``final.partial``, then rename once every rank is done."""
    partial = final.parent / f"{final.name}.partial"
    if rt.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if rt.is_main:
        for f in extra_files:
            shutil.copy(f, partial / f.name)
        (partial / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    dist.barrier()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete one of a run directory."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a megarank checkpoint nor a run directory "
                                "with one")
    return latest


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    rt: Runtime) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the saved train state."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete megarank checkpoint (no {META_FILE})")
    prepare_optimizer_for_load(optimizer)
    model_sd = _unwrap(model).sharded_state_dict()
    template = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                  metadata=optimizer_sharding_metadata()),
        "rng": _rng_object(rt, None),
    }
    loaded = _load(path, template)
    _unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    separate_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    _restore_rng(loaded["rng"], rt.device)
    return dict(loaded["train_state"])


def load_model_weights(path: str | Path, model: torch.nn.Module) -> Path:
    """Load only the model weights of a checkpoint (any TP/PP layout) into ``model``."""
    path = resolve_checkpoint(path)
    model_sd = _unwrap(model).sharded_state_dict()
    loaded = _load(path, {"model": model_sd})
    _unwrap(model).load_state_dict(loaded["model"])
    return path


def _load(path: Path, template: dict[str, Any]) -> dict[str, Any]:
    """dist_checkpointing.load, with a mismatch between checkpoint and config said plainly."""
    try:
        return dist_checkpointing.load(template, str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        raise ValueError(
            f"{path}: the checkpoint does not fit the model built from the config "
            f"({type(e).__name__}: {e})"
        ) from e


def read_meta(path: str | Path) -> dict[str, Any]:
    """megarank.json of a checkpoint (or of a run directory's latest checkpoint)."""
    return json.loads((resolve_checkpoint(path) / META_FILE).read_text())

