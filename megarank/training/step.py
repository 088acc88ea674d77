"""The megatron seam: ``forward_step(data_iterator, model) -> (output, loss_fn)`` and one train step.

Loss reduction lives here and only here. Each micro-batch's loss is the mean over its groups;
megatron divides it by the number of micro-batches and megatron DDP averages gradients over
data-parallel ranks, so the gradient is that of the mean over every group of the global batch
(every micro-batch holds the same number of groups). Micro-batches cut by tokens
(``data.tokens_per_micro_batch``) hold different numbers of groups: each one's mean is then
weighed by its groups x micro-batches / the rank's groups of the step, which comes to the same
mean over the step's groups. The logged loss is reduced the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megarank.data.batch import PairBatch
from megarank.data.truncation import max_over_windows
from megarank.models.dora import weights_changed
from megarank.parallel.megatron import grads_finite_tensor
from megarank.parallel.runtime import Runtime, current_runtime
from megarank.training.flops import step_flops
from megarank.training.losses import group_loss


@dataclass
class StepCounters:
    """What this rank's forward passes saw during one step (for throughput accounting)."""

    model: Any = None
    """cfg.model, for the FLOP count; None skips it."""
    head: str = "classifier"
    real_tokens: int = 0
    padded_tokens: int = 0
    pairs: int = 0
    flops: float = 0.0
    """Model FLOPs (forward + backward) of this rank's micro-batches at their padded length."""
    num_microbatches: int = 0
    """This step's micro-batches (set by `train_step`; the loss weighs by it)."""

    def add(self, batch: PairBatch) -> None:
        """Account one micro-batch (a host-side batch: nothing here waits for a device)."""
        n, t = batch.input_ids.shape
        self.real_tokens += batch.num_real_tokens
        self.padded_tokens += n * t
        self.pairs += batch.num_rows
        if self.model is None:
            return
        if batch.packed is None:
            self.flops += step_flops(self.model, t, num_sequences=n, head=self.head)
        else:  # each segment attends over itself only: count it at its own length
            self.flops += step_flops(self.model, list(batch.packed.segment_lengths),
                                     head=self.head)

    def reset(self) -> None:
        """Start a new step."""
        self.real_tokens = self.padded_tokens = self.pairs = self.num_microbatches = 0
        self.flops = 0.0


def _loss_func(group_size: int, task: Any, teacher: torch.Tensor | None,
               windows: torch.Tensor | None, weight: float,
               scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
    if windows is not None:  # MaxP: a document's score is its best window's
        scores = max_over_windows(scores.float(), windows)
    if teacher is not None:
        teacher = teacher.view(-1, group_size)
    per_group = group_loss(scores.float().view(-1, group_size), task.loss, task.temperature,
                           task.margin, teacher, task.distill_weight,
                           task.teacher_temperature, target=task.target,
                           hard_weight=task.hard_weight, distill_term=task.distill_term)  # [B]
    loss = per_group.mean() if weight == 1.0 else per_group.mean() * weight
    # megatron divides `loss` in place by num_microbatches: report a detached copy.
    return loss, {"loss": loss.detach().clone()}


def make_forward_step(task: Any, device: torch.device, counters: StepCounters,
                      poisoned: Callable[[], bool] | None = None,
                      groups_per_step: int | None = None):
    """The ``forward_step_func`` for megatron's pipeline schedules (training).

    ``poisoned``: fault injection for tests; while it returns True the scores are made NaN, as a
    diverging run's would be. ``groups_per_step``: this rank's groups in a step when
    micro-batches are cut by tokens (each micro-batch's loss is weighed by its share, see the
    module's note); None: every micro-batch holds the same number of groups.
    """

    def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        counters.add(batch)
        batch = batch.to(device, non_blocking=True)
        scores = model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                       batch.pool_index, packed=batch.packed)
        if poisoned is not None and poisoned():
            scores = scores * float("nan")
        weight = 1.0
        if groups_per_step is not None:
            if not counters.num_microbatches:
                raise RuntimeError("micro-batches cut by tokens: pass this forward step's "
                                   "counters to train_step, which records the step's count")
            docs = batch.num_rows if batch.windows is None else batch.windows.shape[0]
            weight = docs // batch.group_size * counters.num_microbatches / groups_per_step
        return scores, partial(_loss_func, batch.group_size, task, batch.teacher_scores,
                               batch.windows, weight)

    return forward_step


def train_step(forward_backward, forward_step, data: Iterator[PairBatch], model, optimizer,
               scheduler, num_microbatches: int, seq_length: int, pairs_per_micro_batch: int,
               counters: StepCounters | None = None, runtime: Runtime | None = None,
               stop_requested: bool = False) -> tuple[dict[str, float], float, float, bool]:
    """One optimizer step over ``num_microbatches`` micro-batches.

    When any rank's loss or gradients are not finite the update is skipped on every rank (the
    weights, the Adam state and the LR schedule stay as they were) and the gradient norm is NaN.
    Returns the step's reduced stats (:func:`reduce_step_stats`), the gradient norm, the
    learning rate the step used, and whether the update was applied.

    The host waits for the device twice a step: once for the reduced stats (which carry the
    finite check, so the micro-batch loop itself never waits), once inside the optimizer for the
    gradient norm that clipping needs.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    if counters is not None:
        counters.num_microbatches = num_microbatches
    losses = forward_backward(
        forward_step_func=forward_step, data_iterator=data, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=pairs_per_micro_batch, forward_only=False,
    )
    lr = optimizer.param_groups[0]["lr"]
    if runtime is None:
        runtime = current_runtime(next(model.parameters()).device)
    stats = reduce_step_stats(losses, counters or StepCounters(), runtime, stop_requested, model)
    if not stats["finite"]:
        return stats, float("nan"), lr, False
    _, grad_norm, _ = optimizer.step()
    weights_changed()  # DoRA's cached weight norms (models/dora.py) are stale now
    scheduler.step(increment=1)
    return stats, float(grad_norm) if grad_norm is not None else float("nan"), lr, True


def reduce_step_stats(losses: list[dict], counters: StepCounters, runtime: Runtime,
                      stop_requested: bool = False, model: Any = None) -> dict[str, Any]:
    """Global mean loss, token and FLOP counts of a step, any rank's stop request and whether
    every rank's losses and gradients are finite, on every rank: one all-reduce and one read.

    Loss: the mean over micro-batches on the last stage, averaged over data-parallel ranks
    (contributed once per DP rank, by TP rank 0). Tokens and FLOPs: summed over DP ranks (first
    stage, TP rank 0). ``model``: whose gradient buffers are checked (None: losses only).
    """
    device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
    # Host numbers travel in one small copy; the device-side terms are added to them there.
    host = torch.tensor([0.0, counters.real_tokens, counters.padded_tokens, counters.flops,
                         float(stop_requested), 0.0], dtype=torch.float64)
    if not (runtime.is_first_stage and runtime.tp_rank == 0):
        host[1:4] = 0.0
    t = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    bad = torch.zeros((), dtype=torch.bool, device=device)
    if losses:
        stacked = torch.stack([d["loss"].reshape(()) for d in losses]).to(device)
        bad = bad | ~torch.isfinite(stacked).all()
        if runtime.is_last_stage and runtime.tp_rank == 0:
            t[0] = stacked.double().mean() / runtime.dp_size
    if model is not None:
        bad = bad | ~grads_finite_tensor(model).to(device)
    t[5] = bad.double()
    # Sum for the counts; MAX is what the flags need, and a sum > 0 says the same.
    dist.all_reduce(t)
    v = t.tolist()
    return {"loss": v[0], "real_tokens": v[1], "padded_tokens": v[2], "flops": v[3],
            "stop": v[4] > 0, "finite": v[5] == 0}
