"""The training loop: the model stage (megarank/stage.py), the optimizer, the data, then
train_step / log / maybe_evaluate / maybe_save per step."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import DictConfig, OmegaConf

from megarank.checkpoint.contract import write_contract
from megarank.checkpoint.dist import (
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
from megarank.eval.rerank import HeldOutEval
from megarank.models.build import padded_vocab_size
from megarank.parallel.megatron import async_save_queue, build_optimizer, weights_are_finite
from megarank.parallel.runtime import Runtime
from megarank.stage import Stage, build_stage, peft_enabled
from megarank.training.flops import mfu, peak_tflops
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
    tr = cfg.trainer
    # A resumed run loads its checkpoint instead of the HF weights: pick the checkpoint first
    # (file checks only, no process group needed yet).
    resume_from, notes = None, []
    if tr.resume and tr.output_dir:
        resume_from, notes = resumable_checkpoint(Path(tr.output_dir) / "checkpoints")
    with build_stage(cfg, load_hf=resume_from is None) as stage:
        return _train(stage, resume_from, notes, poison_steps)


def _train(stage: Stage, latest: Path | None, resume_notes: list[str],
           poison_steps: frozenset[int]) -> dict[str, Any]:
    cfg, derived, rt, model = stage.cfg, stage.derived, stage.rt, stage.model
    tr = cfg.trainer
    setup_logging(rt, cfg.logging.level)
    out = resolve_output_dir(cfg, rt)
    ckpt_root = out / "checkpoints"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rt.is_main:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    optimizer, scheduler = build_optimizer(cfg, model)
    state = {"step": 0, "consumed_samples": 0}
    rng_restored = True
    if cfg.model.init_from and (latest is None or peft_enabled(cfg)):
        # A LoRA run's checkpoints hold adapters and head: its base always comes from here.
        load_model_weights(cfg.model.init_from, model, part="base")
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer, scheduler, rt)
        rng_restored = state.pop("rng_restored")
    if rt.is_main:
        write_contract(out, stage.contract)

    dataset, batches = build_data(cfg, rt, stage.collator, state["consumed_samples"])
    evaluator = None
    if cfg.data.eval_collection and (tr.eval_interval or tr.eval_at_end or tr.eval_at_start):
        evaluator = HeldOutEval(
            cfg.data.eval_collection, cfg.data.eval_run, cfg.data.eval_split,
            cfg.data.eval_top_k, cfg.data.eval_max_queries, stage.collator, tr.eval_batch_size,
            passages=cfg.data.passages,
        )

    log = MetricsLog(rt, out, tr.max_steps, state["step"], tr.progress_bar, cfg.logging, resolved)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_rank = (f"{tr.global_batch_size // derived.dp} groups x {cfg.task.group_size} docs per "
                f"rank per step in micro-batches of at most {cfg.data.tokens_per_micro_batch} "
                "tokens" if cfg.data.tokens_per_micro_batch else
                f"{derived.num_microbatches} micro-batches of {tr.micro_batch_size} groups x "
                f"{cfg.task.group_size} docs per rank per step")
    log.write(f"world {derived.world_size} = tp {derived.tp} x pp {derived.pp} x dp {derived.dp}; "
              f"{per_rank}; kernels: {stage.kernels.name} ({stage.kernels.reason})")
    log.write(describe_fusions(model, optimizer, rt))
    log.write(
        f"model {cfg.model.name}: {n_params:,} parameters on this rank, {n_trainable:,} "
        f"trained{' (' + cfg.peft.method + ')' if peft_enabled(cfg) else ''} (padded vocab "
        f"{padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by)}); "
        f"{len(dataset)} training groups from {cfg.data.train_path}; output in {out}"
    )
    for note in resume_notes:
        log.write(f"passed over for resuming: {note}")
    if latest is not None:
        log.write(f"resumed from {latest} at step {state['step']}" + (
            "" if rng_restored else "; its layout differs from this run's, so the per-rank RNG "
            "states (dropout) start from the seed"))
    elif tr.resume and resume_notes:
        raise CheckpointError(f"trainer.resume=true but no checkpoint under {ckpt_root} is "
                              "intact: " + " | ".join(resume_notes))
    elif tr.resume:
        log.write(f"trainer.resume=true but {ckpt_root} holds no checkpoint: starting fresh")

    counters = StepCounters(model=cfg.model, head=cfg.task.head)
    current = {"step": state["step"]}
    budget = cfg.data.tokens_per_micro_batch
    forward_step = make_forward_step(
        cfg.task, rt.device, counters, lambda: current["step"] in poison_steps,
        groups_per_step=tr.global_batch_size // derived.dp if budget else None)
    forward_backward = get_forward_backward_func()
    window = Window(pairs_per_step=tr.global_batch_size * cfg.task.group_size,
                    world_size=rt.world_size, device_name=device_name(rt.device))
    stop = StopSignal()
    meta = {"config": resolved, "layout": derived.__dict__}
    if peft_enabled(cfg):
        # The frozen base a LoRA checkpoint needs beside it (absent: the checkpoint holds it).
        meta["base_weights"] = cfg.model.init_from or cfg.model.hf_path

    def maybe_evaluate(step: int, record: dict[str, Any], final: bool) -> None:
        due = (tr.eval_interval and step % tr.eval_interval == 0) or (final and tr.eval_at_end)
        if due and evaluator is not None:
            record.update({f"eval/{k}": v for k, v in evaluator.run(model, rt).items()})

    health = {"skipped": 0, "in_a_row": 0}
    queue = async_save_queue() if tr.async_save else None
    marked = best_checkpoint(ckpt_root) if tr.keep_best else None
    best = {"value": marked["value"] if marked else None}

    def improved(record: dict[str, Any]) -> bool:
        """Whether this step's evaluation beats the best so far (trainer.keep_best)."""
        value = record.get(f"eval/{tr.keep_best}") if tr.keep_best else None
        return value is not None and (best["value"] is None or value > best["value"])

    def maybe_save(step: int, final: bool, record: dict[str, Any]) -> None:
        new_best = improved(record)
        due = (tr.save_interval and step % tr.save_interval == 0) or (final and tr.save_final)
        if not (due or new_best):
            return
        # Never a checkpoint right after a skipped step, nor of weights that are not finite:
        # `latest` must always hold weights that still give a finite loss.
        if health["in_a_row"] or not weights_are_finite(model):
            log.write(f"step {step}: not saving (the last step was not finite); the last good "
                      f"checkpoint stays {latest_checkpoint(ckpt_root)}")
            return
        t0 = time.perf_counter()
        value = record.get(f"eval/{tr.keep_best}") if new_best else None
        if new_best:
            best["value"] = value  # taken now, so a later evaluation compares against it
        # One save in flight at a time: the previous one completes before the next starts.
        if queue is not None:
            queue.maybe_finalize_async_calls(blocking=True)

        def completed(path: Path) -> None:
            # Runs when the checkpoint is complete: now (synchronous) or when the writer is
            # done (trainer.async_save, from a later step's finalize).
            done = {"save_total_s": time.perf_counter() - t0}
            if new_best and rt.is_main:
                mark_best(ckpt_root, path, tr.keep_best, value, step)
            if rt.is_main:
                done["save_bytes"] = checkpoint_bytes(path)
                if tr.keep_last is not None:
                    for old in prune_checkpoints(ckpt_root, tr.keep_last):
                        log.write(f"trainer.keep_last={tr.keep_last}: deleted {old.name}")
            dist.barrier()
            if queue is None:
                record.update(done)
            else:
                log.log({"step": current["step"], "checkpoint": path.name, **done})
            log.write(f"saved {path} in {done['save_total_s']:.1f} s" + (
                f"; best {tr.keep_best} so far ({value:.4f})" if new_best else ""))

        save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state, rt, meta,
                        async_queue=queue, on_complete=completed)
        # The time the step loop waited for the save (all of it, unless it is asynchronous).
        record.update(save_s=time.perf_counter() - t0)

    if tr.eval_at_start and evaluator is not None:
        log.log({"step": state["step"], **{f"eval/{k}": v
                                           for k, v in evaluator.run(model, rt).items()}})
    last = tr.max_steps if tr.stop_at_step is None else min(tr.stop_at_step, tr.max_steps)
    record: dict[str, Any] = {"step": state["step"]}
    if state["step"] >= last:  # nothing left to train: still evaluate / save as asked
        maybe_evaluate(last, record, final=True)
        if len(record) > 1:
            log.log(record)
        maybe_save(last, final=True, record=record)
    for step in range(state["step"] + 1, last + 1):
        counters.reset()
        current["step"] = step
        micro_batches = next(batches)
        stats, grad_norm, lr, updated = train_step(
            forward_backward, forward_step, iter(micro_batches), model, optimizer, scheduler,
            len(micro_batches), cfg.data.max_length, derived.pairs_per_micro_batch,
            counters, rt, stop.requested,
        )
        if updated:
            health["in_a_row"] = 0
        else:
            health["skipped"] += 1
            health["in_a_row"] += 1
            log.write(f"step {step}: non-finite loss or gradient; update skipped "
                      f"({health['in_a_row']} in a row, {health['skipped']} in all)")
        if queue is not None:
            queue.maybe_finalize_async_calls(blocking=False)
        window.add(stats, len(micro_batches))
        window.data_wait += batches.take_wait()
        state = {"step": step, "consumed_samples": state["consumed_samples"] + tr.global_batch_size}
        log.advance()

        final = step == last or stats["stop"]
        if stats["stop"]:
            log.write(f"stop requested ({stop.name}): saving at step {step} and exiting")
        record = {"step": step}
        if step % tr.log_interval == 0 or final or not updated:
            record.update(window.flush(), lr=lr, grad_norm=grad_norm,
                          consumed_samples=state["consumed_samples"],
                          skipped_steps=health["skipped"])
        if health["in_a_row"] >= tr.max_nonfinite_steps:
            if queue is not None:  # the last good save completes before the stop
                queue.maybe_finalize_async_calls(blocking=True)
                queue.close()
            log.log(record)
            log.close()
            stop.restore()
            batches.close()
            raise NonFiniteError(
                f"step {step}: {health['in_a_row']} steps in a row with a non-finite loss or "
                f"gradient (trainer.max_nonfinite_steps={tr.max_nonfinite_steps}); stopping. "
                f"The last good checkpoint is {latest_checkpoint(ckpt_root)}; lower optim.lr "
                "or check the data")
        maybe_evaluate(step, record, final)
        maybe_save(step, final or stats["stop"], record)
        if len(record) > 1:
            log.log(record)
        if stats["stop"]:
            break
    if queue is not None:
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    stop.restore()
    batches.close()
    log.close()
    return record


@dataclass
class Window:
    """Sums over the steps since the last logged one, turned into rates when logged."""

    pairs_per_step: int
    world_size: int = 1
    device_name: str | None = None
    steps: int = 0
    loss: float = 0.0
    real_tokens: float = 0.0
    padded_tokens: float = 0.0
    flops: float = 0.0
    data_wait: float = 0.0
    """Seconds the steps waited for their micro-batches (the background prefetch's misses)."""
    micro_batches: int = 0
    """This rank's micro-batches over the window (they vary with data.tokens_per_micro_batch)."""
    t0: float = field(default_factory=time.perf_counter)

    def add(self, stats: dict[str, float], micro_batches: int = 0) -> None:
        """Account one step's reduced stats and this rank's micro-batches in it."""
        self.steps += 1
        self.micro_batches += micro_batches
        self.loss += stats["loss"]
        self.real_tokens += stats["real_tokens"]
        self.padded_tokens += stats["padded_tokens"]
        self.flops += stats["flops"]

    def flush(self) -> dict[str, float]:
        """Mean loss, throughput and model FLOP rate of the window; starts a new one."""
        elapsed = time.perf_counter() - self.t0
        per_gpu = self.flops / elapsed / self.world_size
        out = {
            "loss": self.loss / self.steps,
            "pairs_per_s": self.pairs_per_step * self.steps / elapsed,
            "tokens_per_s": self.real_tokens / elapsed,
            "padded_tokens_per_s": self.padded_tokens / elapsed,
            "padding_fraction": 1.0 - self.real_tokens / max(self.padded_tokens, 1.0),
            "tflops_per_device": per_gpu / 1e12,
            "data_wait_s": self.data_wait / self.steps,
            "micro_batches": self.micro_batches / self.steps,
        }
        if self.device_name is not None:
            found = mfu(per_gpu, self.device_name)
            if found is not None:
                out["mfu"] = found[0]
        self.__init__(self.pairs_per_step, self.world_size, self.device_name)
        return out


def describe_fusions(model: Any, optimizer: Any, rt: Runtime) -> str:
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
    name = device_name(rt.device)
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
