"""The training loop, after torchtitan's: a `Trainer` holds the run's state as attributes and
`Trainer.train` reads as its steps (train_step, log, maybe_evaluate, maybe_save); the model
stage comes from megarank/bundle.py, checkpoints from a `CheckpointManager` and the metric
record from a `MetricsLog`. Whatever way the run ends, one ``finally`` closes what it opened."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import DictConfig, OmegaConf

from megarank.bundle import ModelBundle, build_bundle, peft_enabled
from megarank.checkpoint.manager import CheckpointManager
from megarank.config import padded_vocab_size
from megarank.data.contract import write_contract
from megarank.eval.rerank import HeldOutEval
from megarank.parallel.megatron import build_optimizer
from megarank.parallel.runtime import Runtime
from megarank.training.flops import peak_tflops
from megarank.training.logs import MetricsLog, setup_logging
from megarank.training.setup import build_data, resolve_output_dir
from megarank.training.step import StepCounters, make_forward_step, train_step


class NonFiniteError(RuntimeError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


def train(cfg: DictConfig, poison_steps: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Train a cross-encoder as configured; return the final record (step, loss, eval metrics).

    In this process for a world of one, or on every rank under torchrun; the process group is
    shut down on return. ``poison_steps``: fault injection for tests (those steps' scores are
    made NaN).
    """
    trainer = cfg.trainer
    # A resumed run loads its checkpoint instead of the HF weights: pick the checkpoint first
    # (file checks only, no process group needed yet).
    resume_from, notes = None, []
    if trainer.resume and trainer.output_dir:
        resume_from, notes = CheckpointManager.resumable(trainer.output_dir)
    with build_bundle(cfg, load_hf=resume_from is None) as bundle:
        return Trainer(bundle, resume_from, notes, poison_steps).train()


class Trainer:
    """One training run on a built stage. Its state: ``step`` (the last one taken),
    ``train_state`` (step and consumed samples, what a checkpoint records), the non-finite
    counts (``skipped_steps``, ``nonfinite_in_a_row``) and ``record``, the last step's record;
    the best metric so far is the checkpoint manager's.

    Building it loads the weights (HF, ``model.init_from`` or the checkpoint resumed) and opens
    the data, the metric record and the checkpoint queue; `train` closes them.
    """

    def __init__(self, bundle: ModelBundle, resume_from: Path | None, resume_notes: list[str],
                 poison_steps: frozenset[int] = frozenset()) -> None:
        self.bundle, self.cfg, self.derived = bundle, bundle.cfg, bundle.derived
        self.runtime, self.model, self.trainer = bundle.runtime, bundle.model, bundle.cfg.trainer
        setup_logging(self.runtime, self.cfg.logging.level)
        self.out = resolve_output_dir(self.cfg, self.runtime)
        self.run_config = OmegaConf.to_container(self.cfg, resolve=True)
        if self.runtime.is_main:
            OmegaConf.save(self.cfg, self.out / "config.yaml", resolve=True)
        self.optimizer, self.scheduler = build_optimizer(self.cfg, self.model)
        self.checkpoints = CheckpointManager(
            self.out / "checkpoints", self.trainer, self.runtime, self.model, self.optimizer,
            self.scheduler, self._checkpoint_meta(), write=lambda line: self.metrics.write(line),
            log=lambda done: self.metrics.log({"step": self.step, **done}),
            resume_from=resume_from, resume_notes=resume_notes)
        self.train_state = self.checkpoints.restore(self.cfg.model.init_from,
                                                    base_always=peft_enabled(self.cfg))
        self.step = self.train_state["step"]
        if self.runtime.is_main:
            write_contract(self.out, bundle.contract)
        self.dataset, self.batches = build_data(self.cfg, self.runtime, bundle.collator,
                                                self.train_state["consumed_samples"])
        self.evaluator = self._evaluator()
        self.metrics = MetricsLog(
            self.runtime, self.out, self.trainer.max_steps, self.step, self.trainer.progress_bar,
            self.cfg.logging, self.run_config,
            pairs_per_step=self.trainer.global_batch_size * self.cfg.task.group_size,
            device_name=device_name(self.runtime.device))
        self.counters = StepCounters(model=self.cfg.model, head=self.cfg.pair.head)
        self.forward_step = make_forward_step(
            self.cfg.task, self.runtime.device, self.counters, lambda: self.step in poison_steps,
            groups_per_step=(self.trainer.global_batch_size // self.derived.dp
                             if self.cfg.data.tokens_per_micro_batch else None))
        self.forward_backward = get_forward_backward_func()
        self.stop = StopSignal()
        self.skipped_steps, self.nonfinite_in_a_row = 0, 0
        self.last = (self.trainer.max_steps if self.trainer.stop_at_step is None
                     else min(self.trainer.stop_at_step, self.trainer.max_steps))
        self.record: dict[str, Any] = {"step": self.step}

    def train(self) -> dict[str, Any]:
        """Train the steps left; return the last record. A save in flight completes before it
        returns (and before a non-finite stop); however the run ends, what it opened is
        closed."""
        finished = False
        try:
            self.announce()
            self.maybe_evaluate_at_start()
            if self.step >= self.last:  # nothing left to train: still evaluate / save as asked
                self.finish_without_steps()
            for step in range(self.step + 1, self.last + 1):
                stats, grad_norm, lr = self.train_step(step)
                final = step == self.last or stats["stop"]
                self.record = self.step_record(step, final, grad_norm, lr)
                self.stop_if_diverged(step)
                self.maybe_evaluate(step, final)
                self.maybe_save(step, final)
                self.log()
                if stats["stop"]:
                    break
            finished = True
            return self.record
        finally:
            self.close(finished)

    def announce(self) -> None:
        """The start-up lines: layout, kernels, fusions, model and data, then what resuming
        found."""
        cfg, derived = self.cfg, self.derived
        self.metrics.write(f"world {derived.world_size} = tp {derived.tp} x pp {derived.pp} x "
                           f"dp {derived.dp}; {self._batch_layout()}; kernels: "
                           f"{self.bundle.kernels.name} ({self.bundle.kernels.reason})")
        self.metrics.write(describe_fusions(self.model, self.optimizer, self.runtime))
        n_params = sum(p.numel() for p in self.model.parameters())
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.metrics.write(
            f"model {cfg.model.name}: {n_params:,} parameters on this rank, {n_trainable:,} "
            f"trained{' (' + cfg.peft.method + ')' if peft_enabled(cfg) else ''} (padded vocab "
            f"{padded_vocab_size(cfg.model)}); "
            f"{len(self.dataset)} training groups from {cfg.data.train_path}; output in {self.out}"
        )
        self.checkpoints.report_resume(self.step)

    def maybe_evaluate_at_start(self) -> None:
        """trainer.eval_at_start: the held-out metrics before the first step, as their own
        record."""
        if self.trainer.eval_at_start and self.evaluator is not None:
            self.metrics.log({"step": self.step, **self.evaluate()})

    def finish_without_steps(self) -> None:
        """A run with no step left (resumed at or past its last one) still evaluates and saves
        as asked for its last step."""
        self.maybe_evaluate(self.last, final=True)
        self.log()
        self.maybe_save(self.last, final=True)

    def train_step(self, step: int) -> tuple[dict[str, float], float, float]:
        """One optimizer step over this rank's micro-batches (the update is skipped when the loss
        or a gradient is not finite), then its accounting; returns the reduced stats, the
        gradient norm and the learning rate."""
        self.counters.reset()
        self.step = step
        micro_batches = next(self.batches)
        stats, grad_norm, lr, updated = train_step(
            self.forward_backward, self.forward_step, iter(micro_batches), self.model,
            self.optimizer, self.scheduler, len(micro_batches), self.cfg.pair.max_length,
            self.derived.pairs_per_micro_batch, self.counters, self.runtime, self.stop.requested,
        )
        self.count_health(step, updated)
        self.checkpoints.poll()
        self.metrics.add_step(stats, len(micro_batches), self.batches.take_wait())
        self.train_state = {"step": step, "consumed_samples": self.train_state["consumed_samples"]
                            + self.trainer.global_batch_size}
        if stats["stop"]:
            self.metrics.write(f"stop requested ({self.stop.name}): saving at step {step} and "
                               "exiting")
        return stats, grad_norm, lr

    def count_health(self, step: int, updated: bool) -> None:
        """Count a skipped (non-finite) step, in all and in a row."""
        if updated:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        self.metrics.write(f"step {step}: non-finite loss or gradient; update skipped "
                           f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in all)")

    def step_record(self, step: int, final: bool, grad_norm: float, lr: float) -> dict[str, Any]:
        """The step's record: its rates over the window since the last logged step when it is
        logged (every trainer.log_interval steps, the final step, a skipped one)."""
        record: dict[str, Any] = {"step": step}
        if step % self.trainer.log_interval == 0 or final or self.nonfinite_in_a_row:
            record.update(self.metrics.flush_window(), lr=lr, grad_norm=grad_norm,
                          consumed_samples=self.train_state["consumed_samples"],
                          skipped_steps=self.skipped_steps)
        return record

    def stop_if_diverged(self, step: int) -> None:
        """Stop after trainer.max_nonfinite_steps skipped steps in a row; every rank agrees, as
        the step's stats are reduced over all of them."""
        if self.nonfinite_in_a_row < self.trainer.max_nonfinite_steps:
            return
        self.checkpoints.wait()  # the last good save completes before the stop
        self.metrics.log(self.record)
        raise NonFiniteError(
            f"step {step}: {self.nonfinite_in_a_row} steps in a row with a non-finite loss or "
            f"gradient (trainer.max_nonfinite_steps={self.trainer.max_nonfinite_steps}); stopping. "
            f"The last good checkpoint is {self.checkpoints.latest}; lower optim.lr or check "
            "the data")

    def evaluate(self) -> dict[str, float]:
        """The held-out metrics now, as ``eval/<metric>``."""
        return {f"eval/{k}": v for k, v in self.evaluator.run(self.model, self.runtime).items()}

    def maybe_evaluate(self, step: int, final: bool) -> None:
        """Evaluate into the step's record every trainer.eval_interval steps and at the end
        (trainer.eval_at_end)."""
        trainer = self.trainer
        due = (trainer.eval_interval and step % trainer.eval_interval == 0) or (final and trainer.eval_at_end)
        if due and self.evaluator is not None:
            self.record.update(self.evaluate())

    def maybe_save(self, step: int, final: bool) -> None:
        """Offer the step to the checkpoint manager, which decides and adds its save times."""
        self.checkpoints.maybe_save(step, final, self.record, self.train_state,
                                    finite=not self.nonfinite_in_a_row)

    def log(self) -> None:
        """Write the step's record, unless it holds nothing but its step."""
        if len(self.record) > 1:
            self.metrics.log(self.record)

    def close(self, finished: bool) -> None:
        """Complete the save in flight (only when every rank got here together: after an error
        a rank may be alone, and waiting for the others would hang it), put the signal handlers
        back, stop the data's prefetch and close the metric record."""
        self.checkpoints.close(flush=finished)
        self.stop.restore()
        self.batches.close()
        self.metrics.close()

    def _evaluator(self) -> HeldOutEval | None:
        data, trainer = self.cfg.data, self.trainer
        if not (data.eval_collection and (trainer.eval_interval or trainer.eval_at_end or trainer.eval_at_start)):
            return None
        return HeldOutEval(data.eval_collection, data.eval_run, data.eval_split, data.eval_top_k,
                           data.eval_max_queries, self.bundle.collator, trainer.eval_batch_size,
                           passages=data.passages)

    def _checkpoint_meta(self) -> dict[str, Any]:
        meta = {"config": self.run_config, "layout": self.derived.__dict__}
        if peft_enabled(self.cfg):
            # The frozen base a LoRA checkpoint needs beside it (absent: the checkpoint holds it).
            meta["base_weights"] = self.cfg.model.init_from or self.cfg.model.hf_path
        return meta

    def _batch_layout(self) -> str:
        cfg, derived, trainer = self.cfg, self.derived, self.trainer
        if cfg.data.tokens_per_micro_batch:
            return (f"{trainer.global_batch_size // derived.dp} groups x {cfg.task.group_size} docs "
                    f"per rank per step in micro-batches of at most "
                    f"{cfg.data.tokens_per_micro_batch} tokens")
        return (f"{derived.num_microbatches} micro-batches of {trainer.micro_batch_size} groups x "
                f"{cfg.task.group_size} docs per rank per step")


def describe_fusions(model: Any, optimizer: Any, runtime: Runtime) -> str:
    """A start-up line: which fused paths are on, the optimizer, and the MFU peak used."""
    c = model.config
    fused = {"bias+activation": c.bias_activation_fusion, "bias+dropout+add": c.bias_dropout_fusion,
             "RoPE": c.apply_rope_fusion, "weight-grad accumulation": c.gradient_accumulation_fusion}
    on = [k for k, v in fused.items() if v] or ["none"]
    inner = [type(getattr(o, "optimizer", o)).__module__ + "." + type(getattr(o, "optimizer", o))
             .__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    fused_adam = any(g.get("fused") for o in getattr(optimizer, "chained_optimizers", [optimizer])
                     for g in getattr(getattr(o, "optimizer", None), "param_groups", []))
    line = (f"fusions on: {', '.join(on)}; optimizer: {', '.join(sorted(set(inner)))}"
            f"{' (fused)' if fused_adam else ''}")
    name = device_name(runtime.device)
    if name is not None:
        peak = peak_tflops(name)
        line += (f"; MFU against {peak[1]} bf16 dense peak {peak[0]} TFLOP/s" if peak else
                 f"; no bf16 peak known for {name!r}: MFU not reported")
    return line


def device_name(device: torch.device) -> str | None:
    """The GPU's name for the MFU peak table; None on the CPU (no peak is claimed there)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit, preemption) ask the loop to save
    and exit at the next step boundary; all ranks agree through the per-step all-reduce."""

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
