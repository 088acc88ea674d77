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

import contextlib
import errno
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megarank.models.dora import weights_changed
from megarank.models.lora import ADAPTER
from megarank.parallel.megatron import (
    in_process_write_results,
    optimizer_sharding_metadata,
    prepare_optimizer_for_load,
    separate_adam_steps,
)
from megarank.parallel.runtime import Runtime

META_FILE = "megarank.json"
LATEST = "latest"
BEST = "best"
"""A JSON marker: the checkpoint with the best held-out metric so far (``trainer.keep_best``)."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside megatron's DDP wrapper (which does not forward sharded_state_dict)."""
    return getattr(model, "module", model)


def innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and Float16Module (the CrossEncoder stage)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_state(model: torch.nn.Module, part: str = "saved") -> dict[str, Any]:
    """The model's sharded state dict, or the part of it a checkpoint holds.

    With LoRA over a base that lives elsewhere (``model.hf_path`` or ``model.init_from``: the
    model's ``frozen_base_external``), a checkpoint holds only what trains (adapters, head):
    ``part="saved"``; ``part="base"`` is everything but the adapters, read from that base.
    Otherwise both are the whole model.
    """
    sd = _unwrap(model).sharded_state_dict()
    inner = innermost(model)
    if not getattr(inner, "frozen_base_external", False):
        return sd
    if part == "saved":
        keep = {id(p) for p in inner.parameters()
                if p.requires_grad or getattr(p, "not_in_base", False)}
    else:
        keep = {id(p) for n, p in inner.named_parameters() if f".{ADAPTER}." not in n}
    # ShardedTensor, or a ShardedTensorFactory (megatron's split of a gated fc1): both hold the
    # parameter as ``data``; objects (extra state) carry no weights and stay.
    return {k: v for k, v in sd.items()
            if not isinstance(getattr(v, "data", None), torch.Tensor) or id(v.data) in keep}


def _whole(model: torch.nn.Module) -> bool:
    """Whether a checkpoint of ``model`` holds all of its weights (strict loading)."""
    return not getattr(innermost(model), "frozen_base_external", False)


def _rng_object(runtime: Runtime, state: Any) -> ShardedObject:
    # One RNG state per (pp, tp, dp) rank: dropout streams differ by rank and must resume so.
    return ShardedObject(
        "rng_state", state, (runtime.pp_size, runtime.tp_size, runtime.dp_size),
        (runtime.pp_rank, runtime.tp_rank, runtime.dp_rank), replica_id=0,
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
                    scheduler: Any, train_state: dict[str, Any], runtime: Runtime,
                    meta: dict[str, Any], async_queue: Any = None,
                    on_complete: Callable[[Path], None] | None = None) -> Path:
    """Write a complete training checkpoint of ``step`` under ``root``; collective.

    With ``async_queue`` (megatron's ``AsyncCallsQueue``) the tensors are handed to a writer
    process and this returns at once; the checkpoint becomes complete (renamed, ``latest``
    moved, ``on_complete`` called) when the queue finalizes it. Without, all that happens
    before it returns.
    """
    root = Path(root)
    model_sd = model_state(model)
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd,
                                                  metadata=optimizer_sharding_metadata()),
        "rng": _rng_object(runtime, _capture_rng(runtime.device)),
        "scheduler": scheduler.state_dict(),
        "train_state": dict(train_state),
    }
    final = root / checkpoint_name(step)
    contract = root.parent / "scoring.json"  # the scoring contract travels with every checkpoint

    def complete() -> None:
        if runtime.is_main:
            tmp = root / f"{LATEST}.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, root / LATEST)
        dist.barrier()
        if on_complete is not None:
            on_complete(final)

    write_atomically(final, state, {**meta, "step": step, "train_state": dict(train_state)}, runtime,
                     extra_files=[contract] if contract.is_file() else [],
                     async_queue=async_queue, then=complete)
    return final


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, runtime: Runtime,
                          meta: dict[str, Any], extra_files: list[Path] = ()) -> Path:
    """Write the model weights alone (e.g. an HF import) as a megarank checkpoint; collective."""
    state = {"model": model_state(model)}
    write_atomically(Path(path), state, {**meta, "step": 0, "train_state": None}, runtime,
                     extra_files=list(extra_files))
    return Path(path)


def write_atomically(final: Path, state: dict[str, Any], meta: dict[str, Any], runtime: Runtime,
                     extra_files: list[Path], async_queue: Any = None,
                     then: Callable[[], None] | None = None) -> None:
    """dist_checkpointing.save into ``final.partial``, then rename once every rank is done.

    ``megarank.json`` (written last, by rank 0) records every file with its size, so a later
    load can tell a complete checkpoint from a damaged one. A full disk stops with an error
    naming the directory; what was complete before stays as it was. With ``async_queue`` the
    write runs in megatron's writer process and the rename (then ``then``) happens when the
    queue finalizes the request.
    """
    partial = final.parent / f"{final.name}.partial"

    def finish() -> None:
        with _saving(final, partial, runtime):
            dist.barrier()
            if runtime.is_main:
                for f in extra_files:
                    shutil.copy(f, partial / f.name)
                files = {str(p.relative_to(partial)): p.stat().st_size
                         for p in sorted(partial.rglob("*")) if p.is_file()}
                (partial / META_FILE).write_text(
                    json.dumps({**meta, "files": files}, indent=2, default=str))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
            dist.barrier()
        if then is not None:
            then()

    with _saving(final, partial, runtime):
        if runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        if async_queue is None:
            with in_process_write_results():
                dist_checkpointing.save(state, str(partial))
        else:
            request = dist_checkpointing.save(state, str(partial), async_sharded_save=True)
            request.add_finalize_fn(finish)
            async_queue.schedule_async_request(request)
            return
    finish()


@contextlib.contextmanager
def _saving(final: Path, partial: Path, runtime: Runtime) -> Iterator[None]:
    """A failed save removes its partial directory; a full disk is said plainly."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        # torch's writers do not always keep the errno: a device with (almost) nothing left
        # after a failed write is taken as full too.
        full = _disk_full(e) or shutil.disk_usage(final.parent).free < 2**20
        if runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise CheckpointError(
                f"no space left on the device while writing {partial}: the checkpoint was not "
                f"taken, and every earlier complete checkpoint is as it was ({e})") from e
        raise


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: torch's checkpoint writers re-raise it as a RuntimeError
    ("Worker failure: [Errno 28] No space left on device")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if f"[Errno {errno.ENOSPC}]" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or one on disk is damaged (named in the message)."""


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint on disk, as its megarank.json records them."""
    return sum(json.loads((Path(path) / META_FILE).read_text()).get("files", {}).values())


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with a checkpoint's files, by file: missing, or not the size written.

    Empty when every file recorded at save time is there with its size (checkpoints written
    before sizes were recorded are taken as they are).
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        return [f"{path / META_FILE} is missing (the save never completed)"]
    files = json.loads((path / META_FILE).read_text()).get("files")
    problems = []
    for name, size in (files or {}).items():
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{f} has {f.stat().st_size} bytes, {size} were written "
                            "(truncated or overwritten)")
    return problems


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under a run's ``checkpoints/``, newest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")
             and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def resumable_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint whose files are intact, notes on the newer ones passed over).

    ``latest`` is tried first; when its files are damaged (or it names nothing complete), each
    older complete checkpoint in turn. Every file check, no process group needed.
    """
    root = Path(root)
    notes: list[str] = []
    try:
        first = latest_checkpoint(root)
    except FileNotFoundError as e:
        first, notes = None, [str(e)]
    candidates = ([first] if first is not None else []) + [
        p for p in complete_checkpoints(root) if p != first]
    if first is None and not candidates:
        return None, notes
    for path in candidates:
        problems = verify_checkpoint(path)
        if not problems:
            return path, notes
        notes.append(f"{path.name} is damaged: " + "; ".join(problems))
    return None, notes


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the ones ``latest``
    and ``best`` name); returns what was deleted. Rank 0 only."""
    root = Path(root)
    keep = set(complete_checkpoints(root)[:keep_last])
    latest = latest_checkpoint(root)
    if latest is not None:
        keep.add(latest)
    best = best_checkpoint(root)
    if best is not None:
        keep.add(best["path"])
    removed = [p for p in complete_checkpoints(root) if p not in keep]
    for p in removed:
        # Rename first, so an interrupted delete never leaves something that looks complete.
        doomed = p.with_name(p.name + ".deleting")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory, or a run directory's latest (``which="latest"``) or best
    (``which="best"``, see ``trainer.keep_best``) complete checkpoint."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    root = path / "checkpoints"
    if which == "best":
        best = best_checkpoint(root)
        if best is None:
            raise FileNotFoundError(f"{root / BEST}: no best checkpoint was marked (train with "
                                    "trainer.keep_best=METRIC and evaluation on)")
        return best["path"]
    latest = latest_checkpoint(root) if root.is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a megarank checkpoint nor a run directory "
                                "with one")
    return latest


def best_checkpoint(root: str | Path) -> dict[str, Any] | None:
    """The ``best`` marker of a run's checkpoints/ folder (checkpoint path, metric, value,
    step), or None when nothing was marked."""
    marker = Path(root) / BEST
    if not marker.is_file():
        return None
    best = json.loads(marker.read_text())
    path = Path(root) / best["checkpoint"]
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which is not a complete megarank "
                                f"checkpoint (no {META_FILE})")
    return {**best, "path": path}


def mark_best(root: str | Path, checkpoint: Path, metric: str, value: float, step: int) -> None:
    """Point the ``best`` marker at ``checkpoint`` (atomically; rank 0)."""
    tmp = Path(root) / f"{BEST}.tmp"
    tmp.write_text(json.dumps({"checkpoint": checkpoint.name, "metric": metric, "value": value,
                               "step": step}))
    os.replace(tmp, Path(root) / BEST)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    runtime: Runtime) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the saved train state.

    The model and optimizer reshard to any TP/PP/DP layout. The RNG states are per rank of the
    saved layout: in another layout they are not restored (dropout streams start from the seed
    there), and the returned state says so under ``"rng_restored"``.
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete megarank checkpoint (no {META_FILE})")
    saved = json.loads((path / META_FILE).read_text()).get("layout") or {}
    # A checkpoint that does not record its layout is taken to be this run's.
    same_layout = not saved or (saved.get("tp"), saved.get("pp"), saved.get("dp")) == (
        runtime.tp_size, runtime.pp_size, runtime.dp_size)
    prepare_optimizer_for_load(optimizer)
    model_sd = model_state(model)
    template = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                  metadata=optimizer_sharding_metadata()),
    }
    if same_layout:
        template["rng"] = _rng_object(runtime, None)
    loaded = _load(path, template)
    _unwrap(model).load_state_dict(loaded["model"], strict=_whole(model))
    weights_changed()
    optimizer.load_state_dict(loaded["optimizer"])
    separate_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng"], runtime.device)
    return {**loaded["train_state"], "rng_restored": same_layout}


def load_model_weights(path: str | Path, model: torch.nn.Module, part: str = "saved") -> Path:
    """Load only the model weights of a checkpoint (any TP/PP layout) into ``model``:
    ``part="saved"`` what a checkpoint of this model holds, ``"base"`` the frozen base of a
    LoRA model from a full-model checkpoint (see :func:`model_state`)."""
    path = resolve_checkpoint(path)
    model_sd = model_state(model, part)
    loaded = _load(path, {"model": model_sd})
    _unwrap(model).load_state_dict(loaded["model"], strict=_whole(model))
    weights_changed()
    return path


def _load(path: Path, template: dict[str, Any]) -> dict[str, Any]:
    """dist_checkpointing.load, with damaged files and a mismatch between checkpoint and config
    said plainly (the files are checked first, so a truncated one is named as such)."""
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"{path} is damaged: " + "; ".join(problems))
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

