"""A training run's checkpoints as one object: when to save, what to keep, where to resume.

The training loop offers every step and the manager decides: a step is saved when
``trainer.save_interval`` or ``trainer.save_final`` asks for it, or when its evaluation is the
best so far (``trainer.keep_best``). It never saves right after a skipped step nor weights that
are not finite, so ``latest`` always holds weights that still give a finite loss. Saves go
through megarank/checkpoint/sharded.py (atomic; with ``trainer.async_save`` in megatron's writer
process, one save in flight at a time); once a checkpoint is complete the best is marked and
the older ones pruned (``trainer.keep_last``, which never drops the best). On resume it takes the
newest intact checkpoint and names the damaged ones it passed over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megarank.checkpoint.sharded import (
    CheckpointError,
    best_checkpoint,
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    mark_best,
    prune_checkpoints,
    resumable_checkpoint,
    save_checkpoint,
)
from megarank.models.dora import reset_magnitudes
from megarank.parallel.megatron import async_save_queue, weights_are_finite
from megarank.parallel.runtime import Runtime


class CheckpointManager:
    """Save, retention (keep_last, keep_best), asynchronous saves and resume for one run's
    ``checkpoints/`` directory.

    ``trainer`` is the run's ``trainer`` config group; ``meta`` goes into every checkpoint's
    megarank.json. ``write`` takes a log line; ``log`` takes the record of an asynchronous save
    that completed (``checkpoint``, ``save_total_s``, ``save_bytes``), whose step is the
    caller's.
    """

    def __init__(self, root: Path, trainer: Any, runtime: Runtime, model: torch.nn.Module, optimizer: Any,
                 scheduler: Any, meta: dict[str, Any], write: Callable[[str], None],
                 log: Callable[[dict[str, Any]], None], resume_from: Path | None = None,
                 resume_notes: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.trainer, self.runtime, self.meta = trainer, runtime, meta
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.write, self.log = write, log
        self.resume_from, self.resume_notes = resume_from, list(resume_notes)
        self.rng_restored = True
        self.queue = async_save_queue() if trainer.async_save else None
        marked = best_checkpoint(self.root) if trainer.keep_best else None
        self.best_value: float | None = marked["value"] if marked else None

    @staticmethod
    def resumable(output_dir: str | Path) -> tuple[Path | None, list[str]]:
        """The checkpoint a resumed run in ``output_dir`` starts from (the newest intact one),
        and a note for each damaged one passed over; file checks only, no process group."""
        return resumable_checkpoint(Path(output_dir) / "checkpoints")

    @property
    def latest(self) -> Path | None:
        """The newest complete checkpoint."""
        return latest_checkpoint(self.root)

    def restore(self, init_from: str | None, base_always: bool) -> dict[str, Any]:
        """Load what the run starts from; return its train state (step, consumed_samples).

        ``init_from`` (model.init_from) gives a fresh run's weights, and with ``base_always``
        (LoRA, whose checkpoints hold adapters and head) the base of a resumed run too.
        """
        if init_from and (self.resume_from is None or base_always):
            load_model_weights(init_from, self.model, part="base")
        if self.resume_from is None:
            if init_from:
                # The weights changed under the optimizer, built before: DoRA's magnitudes
                # (the norms of W's rows) follow the loaded base, and mixed precision's fp32
                # main weights are copied again from the model's.
                reset_magnitudes(self.model)
                self.optimizer.reload_model_params()
            return {"step": 0, "consumed_samples": 0}
        state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler,
                                self.runtime)
        self.rng_restored = state.pop("rng_restored")
        return state

    def report_resume(self, step: int) -> None:
        """Say what resuming found; refuse a resume whose every checkpoint is damaged."""
        for note in self.resume_notes:
            self.write(f"passed over for resuming: {note}")
        if self.resume_from is not None:
            self.write(f"resumed from {self.resume_from} at step {step}" + (
                "" if self.rng_restored else "; its layout differs from this run's, so the "
                "per-rank RNG states (dropout) start from the seed"))
        elif self.trainer.resume and self.resume_notes:
            raise CheckpointError(f"trainer.resume=true but no checkpoint under {self.root} is "
                                  "intact: " + " | ".join(self.resume_notes))
        elif self.trainer.resume:
            self.write(f"trainer.resume=true but {self.root} holds no checkpoint: starting fresh")

    def maybe_save(self, step: int, final: bool, record: dict[str, Any],
                   train_state: dict[str, Any], finite: bool = True) -> None:
        """Save ``step`` if it is due or ``record``'s evaluation is the best so far; collective.

        ``finite``: the last step was applied (not skipped). ``record`` gets ``save_s``, the time
        the step loop waited, and for a synchronous save the completion's times and size.
        """
        new_best = self._improved(record)
        if not (self._due(step, final) or new_best):
            return
        if not finite or not weights_are_finite(self.model):
            self.write(f"step {step}: not saving (the last step was not finite); the last good "
                       f"checkpoint stays {self.latest}")
            return
        t0 = time.perf_counter()
        best = record.get(f"eval/{self.trainer.keep_best}") if new_best else None
        if new_best:
            self.best_value = best  # taken now, so a later evaluation compares against it
        self.wait()  # one save in flight at a time: the previous one completes first
        save_checkpoint(self.root, step, self.model, self.optimizer, self.scheduler, train_state,
                        self.runtime, self.meta, async_queue=self.queue,
                        on_complete=self._completion(step, t0, best, record))
        record.update(save_s=time.perf_counter() - t0)

    def poll(self) -> None:
        """Complete the asynchronous saves every rank has finished writing; never waits."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Complete the asynchronous save in flight, waiting for its writer."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self, flush: bool = True) -> None:
        """Complete the save in flight (``flush``) and close the queue. Without ``flush`` (a
        rank leaving on an error, perhaps alone) nothing waits for the other ranks."""
        if self.queue is None:
            return
        if flush:
            self.wait()
        self.queue.close(abort=not flush)

    def _due(self, step: int, final: bool) -> bool:
        trainer = self.trainer
        return bool((trainer.save_interval and step % trainer.save_interval == 0)
                    or (final and trainer.save_final))

    def _improved(self, record: dict[str, Any]) -> bool:
        """Whether this step's evaluation beats the best so far (trainer.keep_best)."""
        value = record.get(f"eval/{self.trainer.keep_best}") if self.trainer.keep_best else None
        return value is not None and (self.best_value is None or value > self.best_value)

    def _completion(self, step: int, t0: float, best: float | None,
                    record: dict[str, Any]) -> Callable[[Path], None]:
        """What runs once the checkpoint of ``step`` is complete: now (synchronous) or when the
        writer is done (trainer.async_save, from a later step's `poll` or `wait`). ``best``:
        the metric's value when this checkpoint is the best so far."""

        def completed(path: Path) -> None:
            done = {"save_total_s": time.perf_counter() - t0}
            if best is not None and self.runtime.is_main:
                mark_best(self.root, path, self.trainer.keep_best, best, step)
            if self.runtime.is_main:
                done["save_bytes"] = checkpoint_bytes(path)
                self._prune()
            dist.barrier()
            if self.queue is None:
                record.update(done)
            else:
                self.log({"checkpoint": path.name, **done})
            self.write(f"saved {path} in {done['save_total_s']:.1f} s" + (
                f"; best {self.trainer.keep_best} so far ({best:.4f})" if best is not None else ""))

        return completed

    def _prune(self) -> None:
        """Keep the newest trainer.keep_last checkpoints (and the best); rank 0."""
        if self.trainer.keep_last is not None:
            for old in prune_checkpoints(self.root, self.trainer.keep_last):
                self.write(f"trainer.keep_last={self.trainer.keep_last}: deleted {old.name}")
