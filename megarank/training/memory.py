"""Measured memory of a built stage: the figures ``megarank.training.sizing`` estimates, counted
on the tensors themselves.

- weights: the bytes of the stage's parameters (shared storage counted once);
- gradients: megatron DDP's fp32 ``main_grad`` of every parameter;
- optimizer state after one step: Adam's ``exp_avg`` and ``exp_avg_sq`` and the fp32 main
  weights where they are copies (bf16/fp16), for this rank's shard;
- activations: the bytes of the tensors autograd saves for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once and the parameters left out:
  ``saved`` for the forward of one micro-batch, and ``peak`` the most held at once during a
  whole training step (the pipeline schedule's micro-batches in flight, and a recomputed
  layer's tensors during the backward). On CUDA the allocator's own peak is recorded beside them.

The micro-batches are synthetic and full length (random token ids, no padding), so they have
exactly the shape the plan assumes: ``trainer.micro_batch_size`` groups x ``task.group_size``
documents x ``pair.max_length`` tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from megarank.data.batch import PairBatch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Saved:
    """A saved tensor's box: when autograd drops it, its storage stops counting."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensors:
    """Bytes of the tensors autograd saves while active, each storage once, weights excluded.

    ``seen``: every storage saved since the start (what one forward keeps); ``live`` and
    ``peak``: storages some saved tensor still holds, now and at most.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {_storage(p)[0] for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.holders: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, ptr: int, nbytes: int) -> None:
        self.holders[ptr] -= 1
        if self.holders[ptr] == 0:
            del self.holders[ptr]
            self.live -= nbytes

    def pack(self, t: torch.Tensor) -> Any:
        ptr, nbytes = _storage(t)
        if not ptr or ptr in self.weights:
            return t
        self.seen.setdefault(ptr, nbytes)
        if ptr not in self.holders:
            self.holders[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.holders[ptr] += 1
        box = _Saved(t)
        weakref.finalize(box, self._release, ptr, nbytes)
        return box

    @staticmethod
    def unpack(box: Any) -> torch.Tensor:
        return box.tensor if isinstance(box, _Saved) else box

    @property
    def saved(self) -> int:
        """Bytes of every storage saved so far."""
        return sum(self.seen.values())

    @contextmanager
    def active(self) -> Iterator[SavedTensors]:
        """Count what autograd saves inside the block (also in the backward's recompute)."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


@dataclass(frozen=True)
class MeasuredMemory:
    """What one rank's stage holds, measured (bytes)."""

    params: int
    """Parameters of this rank's stage."""
    weights: int
    """Bytes of the parameters (a storage shared by several counted once)."""
    grads: int
    """fp32 main gradients (megatron DDP's buffers, without their padding)."""
    grad_buffers: int
    """The DDP gradient buffers as allocated (with padding)."""
    optimizer: int
    """Adam moments + fp32 main-weight copies of this rank, after one step."""
    saved: int | None
    """Activation bytes saved by the forward of one micro-batch (None on a pipeline, where a
    stage cannot run one alone: compare ``peak``)."""
    peak: int
    """The most activation bytes held at once during one training step."""
    cuda_peak: int | None = None
    """torch.cuda.max_memory_allocated over the step, on CUDA."""


def synthetic_batch(cfg: Any, seed: int = 0) -> PairBatch:
    """A full-length micro-batch of random ids: micro_batch_size groups x group_size documents
    x pair.max_length tokens, no padding, pooled as the family pools."""
    n = int(cfg.trainer.micro_batch_size) * int(cfg.task.group_size)
    s = int(cfg.pair.max_length)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, int(cfg.model.vocab_size), (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    pool = (torch.full((n,), s - 1) if cfg.model.family == "gpt"
            else torch.zeros(n, dtype=torch.long))
    return PairBatch(ids, mask, torch.zeros_like(ids), pool, int(cfg.task.group_size), n * s)


def optimizer_state_bytes(optimizer: Any, model: torch.nn.Module) -> int:
    """This rank's Adam moments plus the fp32 main parameters that are copies of the weights."""
    weights = {_storage(p)[0] for p in model.parameters()}
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    t = inner.state[p][key]
                    total += t.numel() * t.element_size()
                if _storage(p)[0] not in weights:
                    total += p.numel() * p.element_size()
    return total


def measure_stage(bundle: Any) -> MeasuredMemory:
    """Build the optimizer of a built model bundle (this rank's pipeline stage), run one
    training step on synthetic full-length micro-batches and measure (see the module
    docstring). The bundle's weights change."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarank.parallel.megatron import build_optimizer
    from megarank.training.step import StepCounters, make_forward_step, train_step

    cfg, model, runtime = bundle.cfg, bundle.model, bundle.runtime
    params = {id(p): p for p in model.parameters()}
    weights = {}
    for p in params.values():
        ptr, _ = _storage(p)
        weights[(ptr, p.storage_offset(), p.numel())] = p.numel() * p.element_size()
    optimizer, scheduler = build_optimizer(cfg, model)
    forward_step = make_forward_step(cfg.task, runtime.device, StepCounters())
    d = bundle.derived

    # One micro-batch's forward, outside the schedule (a pipeline stage cannot run one alone).
    saved = None
    if runtime.pp_size == 1:
        model.train()
        model.zero_grad_buffer()
        tracker = SavedTensors(model)
        with tracker.active():
            scores, loss_func = forward_step(iter([synthetic_batch(cfg)]), model)
            loss, _ = loss_func(scores)
        saved = tracker.saved
        del scores, loss, loss_func, tracker
        model.zero_grad_buffer()

    batches = (synthetic_batch(cfg, seed=i) for i in range(d.num_microbatches))
    tracker = SavedTensors(model)
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracker.active():
        train_step(get_forward_backward_func(), forward_step, batches, model, optimizer,
                   scheduler, d.num_microbatches, int(cfg.pair.max_length),
                   d.pairs_per_micro_batch)
    cuda_peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params.values()
                if getattr(p, "main_grad", None) is not None)
    buffers = sum(b.grad_data.numel() * b.grad_data.element_size()
                  for b in getattr(model, "buffers", []))
    out = MeasuredMemory(
        params=sum(p.numel() for p in params.values()), weights=sum(weights.values()),
        grads=grads, grad_buffers=buffers, optimizer=optimizer_state_bytes(optimizer, model),
        saved=saved, peak=tracker.peak, cuda_peak=cuda_peak,
    )
    if dist.is_initialized():
        dist.barrier()
    return out


def measure(cfg: Any, device: str | None = None) -> list[tuple[MeasuredMemory, int]]:
    """Build this rank's stage of ``cfg`` (fresh weights, no HF weights read), measure one
    training step on it and gather every rank's (measurement, pipeline stage), in rank order.
    Shuts the process group down before it returns."""
    import torch.distributed as dist

    from megarank.bundle import build_bundle

    with build_bundle(cfg, load_hf=False, device=device) as bundle:
        mine = (measure_stage(bundle), bundle.runtime.pp_rank)
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return every


def comparison_rows(plan: Any, measured: MeasuredMemory, stage: int) -> list[tuple[str, int, int]]:
    """(figure, planned bytes, measured bytes) for one rank of pipeline stage ``stage``."""
    s = plan.stages[stage]
    r = plan.recompute
    optim = s.optim_distributed if plan.distributed_optimizer else s.optim_plain
    rows = [("parameters", s.params, measured.params), ("weights", s.weights, measured.weights),
            ("gradients", s.grads, measured.grads), ("optimizer state", optim, measured.optimizer)]
    if measured.saved is not None:
        rows.append((f"activations / micro-batch ({r})", s.saved_per_micro_batch[r],
                     measured.saved))
    # The hooks see what autograd saves: the pipeline's kept outputs are not among it.
    rows.append((f"activation peak in a step ({r})", s.activations(r) - s.pipeline_outputs,
                 measured.peak))
    return rows


def format_comparison(plan: Any, by_rank: list[tuple[MeasuredMemory, int]]) -> str:
    """Planned next to measured, one block per rank (bytes and measured / planned)."""
    lines = []
    for rank, (m, stage) in enumerate(by_rank):
        lines.append(f"rank {rank} (stage {stage})".ljust(40) + "planned".rjust(16)
                     + "measured".rjust(16) + "ratio".rjust(8))
        for name, want, got in comparison_rows(plan, m, stage):
            ratio = f"{got / want:.3f}" if want else "-"
            lines.append(f"  {name}".ljust(40) + f"{want:,}".rjust(16) + f"{got:,}".rjust(16)
                         + ratio.rjust(8))
        if m.cuda_peak is not None:
            lines.append("  CUDA allocator peak in the step".ljust(40) + "".rjust(16)
                         + f"{m.cuda_peak:,}".rjust(16))
    return "\n".join(lines)
