"""The megatron seam: ``forward_step(data_iterator, model) -> (output, loss_fn)`` and one train step.

Loss reduction lives here and only here. Each micro-batch's loss is the mean over its groups;
megatron divides it by the number of micro-batches and megatron DDP averages gradients over
data-parallel ranks, so the gradient is that of the mean over every group of the global batch
(every micro-batch holds the same number of groups). The logged loss is reduced the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megarank.data.collate import PairBatch, max_over_windows
from megarank.parallel.megatron import grads_are_finite
from megarank.parallel.runtime import Runtime
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
            cu = batch.packed.cu_seqlens
            self.flops += step_flops(self.model, (cu[1:] - cu[:-1]).tolist(), head=self.head)

    def reset(self) -> None:
        """Start a new step."""
        self.real_tokens = self.padded_tokens = self.pairs = 0
        self.flops = 0.0


def _loss_func(group_size: int, task: Any, teacher: torch.Tensor | None,
               windows: torch.Tensor | None, scores: torch.Tensor) -> tuple[torch.Tensor, dict]:
    if windows is not None:  # MaxP: a document's score is its best window's
        scores = max_over_windows(scores.float(), windows)
    if teacher is not None:
        teacher = teacher.view(-1, group_size)
    per_group = group_loss(scores.float().view(-1, group_size), task.loss, task.temperature,
                           task.margin, teacher, task.distill_weight,
                           task.teacher_temperature, target=task.target,
                           hard_weight=task.hard_weight, distill_term=task.distill_term)  # [B]
    loss = per_group.mean()
    # megatron divides `loss` in place by num_microbatches: report a detached copy.
    return loss, {"loss": loss.detach().clone()}


def make_forward_step(task: Any, device: torch.device, counters: StepCounters,
                      poisoned: Callable[[], bool] | None = None):
    """The ``forward_step_func`` for megatron's pipeline schedules (training).

    ``poisoned``: fault injection for tests; while it returns True the scores are made NaN, as a
    diverging run's would be.
    """

    def forward_step(data_iterator: Iterator[PairBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        counters.add(batch)
        batch = batch.to(device, non_blocking=True)
        scores = model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                       batch.pool_index, packed=batch.packed)
        if poisoned is not None and poisoned():
            scores = scores * float("nan")
        return scores, partial(_loss_func, batch.group_size, task, batch.teacher_scores,
                               batch.windows)

    return forward_step


def train_step(forward_backward, forward_step, data: Iterator[PairBatch], model, optimizer,
               scheduler, num_microbatches: int, seq_length: int,
               pairs_per_micro_batch: int) -> tuple[list[dict], float, float, bool]:
    """One optimizer step over ``num_microbatches`` micro-batches.

    When any rank's loss or gradients are not finite the update is skipped on every rank (the
    weights, the Adam state and the LR schedule stay as they were) and the gradient norm is NaN.
    Returns the loss dicts of the last stage's micro-batches, the gradient norm, the learning
    rate the step used, and whether the update was applied.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(
        forward_step_func=forward_step, data_iterator=data, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=pairs_per_micro_batch, forward_only=False,
    )
    lr = optimizer.param_groups[0]["lr"]
    if not _finite_everywhere(losses, model):
        return losses, float("nan"), lr, False
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return losses, float(grad_norm) if grad_norm is not None else float("nan"), lr, True


def _finite_everywhere(losses: list[dict], model: Any) -> bool:
    """Whether every rank's losses and gradients are finite (one all-reduce)."""
    bad = any(not bool(torch.isfinite(d["loss"]).all()) for d in losses)
    bad = bad or not grads_are_finite(model)
    device = next(model.parameters()).device
    flag = torch.tensor([float(bad)], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def reduce_step_stats(losses: list[dict], counters: StepCounters, rt: Runtime,
                      stop_requested: bool = False) -> dict[str, float]:
    """Global mean loss, token and FLOP counts of a step, and any rank's stop request, on every
    rank, in one all-reduce.

    Loss: the mean over micro-batches on the last stage, averaged over data-parallel ranks
    (contributed once per DP rank, by TP rank 0). Tokens and FLOPs: summed over DP ranks (first
    stage, TP rank 0).
    """
    t = torch.zeros(5, dtype=torch.float64)
    if rt.is_last_stage and rt.tp_rank == 0 and losses:
        t[0] = torch.stack([d["loss"].double().cpu() for d in losses]).mean() / rt.dp_size
    if rt.is_first_stage and rt.tp_rank == 0:
        t[1] = counters.real_tokens
        t[2] = counters.padded_tokens
        t[3] = counters.flops
    t[4] = float(stop_requested)
    if rt.device.type == "cuda":
        t = t.to(rt.device)
    dist.all_reduce(t)
    return {"loss": float(t[0]), "real_tokens": float(t[1]), "padded_tokens": float(t[2]),
            "flops": float(t[3]), "stop": bool(t[4] > 0)}
