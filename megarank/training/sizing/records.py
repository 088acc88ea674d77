"""What a plan is made of: the constants it counts in, one activation :class:`Term`, a
:class:`StagePlan` per pipeline stage and the :class:`MemoryPlan` of a whole layout."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")
DEVICES = ("cpu", "cuda")
WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
INT64 = 8
HEADROOM = 0.10
"""Share of a card's memory the plan leaves free: the CUDA context, NCCL's buffers, the caching
allocator's fragmentation and the backward's short-lived gradient tensors (not modelled term by
term)."""


@dataclass(frozen=True)
class Term:
    """One kind of tensor autograd keeps for backward, in one layer (or stage) of one GPU."""

    name: str
    """What it is, e.g. ``fc1 output``."""
    elements: float
    """Elements per token (per position when ``per_position``) on this GPU."""
    width: int
    """Bytes per element."""
    kept: tuple[str, ...] = ("none", "selective")
    """The recompute modes that keep it (``full`` keeps only each layer's input)."""
    per_position: bool = False
    """Counted once per position of the sequence (RoPE tables), not per token of the batch."""
    after_core: bool = False
    """Made after the core attention (projection, MLP): the backward frees it before it
    recomputes the core attention."""

    def bytes(self, sequences: int, length: int) -> float:
        """Bytes for a micro-batch of ``sequences`` x ``length`` tokens."""
        n = length if self.per_position else sequences * length
        return self.elements * self.width * n


@dataclass(frozen=True)
class StagePlan:
    """What one GPU of one pipeline stage holds (every TP and DP rank of a stage holds alike)."""

    stage: int
    """Pipeline rank."""
    layers: int
    """Transformer layers on this stage."""
    params: int
    """Parameters on this GPU (its tensor-parallel shard of the stage)."""
    weights: int
    """Bytes of the weights in the training precision."""
    grads: int
    """Bytes of megatron DDP's gradient buffer (fp32 in every precision)."""
    optim_plain: int
    """Optimizer state with the plain optimizer: Adam's two fp32 moments, plus fp32 main weights
    for bf16/fp16."""
    optim_distributed: int
    """The same sharded over data parallel (ZeRO-1): optim_plain / dp."""
    saved_per_micro_batch: dict[str, int]
    """Activation bytes autograd keeps for one micro-batch on this stage, per recompute mode."""
    working_set: dict[str, int]
    """Bytes a recompute mode needs again for a moment during the backward (one layer re-run)."""
    in_flight: int
    """Micro-batches whose activations the pipeline schedule holds at once on this stage."""
    pipeline_outputs: int
    """Bytes of the in-flight micro-batches' stage outputs kept for the next stage's gradient
    (0 on the last stage)."""

    def activations(self, recompute: str) -> int:
        """Peak activation bytes under ``recompute``: in-flight micro-batches plus the working set
        and the kept pipeline outputs."""
        return (self.in_flight * self.saved_per_micro_batch[recompute]
                + self.working_set[recompute] + self.pipeline_outputs)

    def total(self, recompute: str, distributed_optimizer: bool) -> int:
        """Bytes this GPU needs under a recompute mode and optimizer choice."""
        optim = self.optim_distributed if distributed_optimizer else self.optim_plain
        return self.weights + self.grads + optim + self.activations(recompute)


@dataclass(frozen=True)
class MemoryPlan:
    """The per-GPU memory and the FLOPs of a config on ``world_size`` GPUs."""

    name: str
    """The model's name (``model.name``)."""
    world_size: int
    """GPUs planned for."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size (one StagePlan per stage)."""
    dp: int
    """Data-parallel size: world_size / (tp * pp)."""
    precision: str
    """``trainer.precision``."""
    device: str
    """Which kernels the activation terms follow: ``cuda`` (TE / fused / flash) or ``cpu``."""
    recompute: str
    """``trainer.recompute``: the mode :meth:`total` uses."""
    distributed_optimizer: bool
    """``parallel.use_distributed_optimizer``: the optimizer :meth:`total` uses."""
    sequence_parallel: bool
    """``parallel.sequence_parallel``: the non-TP activations are split over the TP group."""
    groups: int
    """Query groups per micro-batch (``trainer.micro_batch_size``)."""
    documents: int
    """Documents per group (``task.group_size``)."""
    length: int
    """Tokens per sequence planned for (``pair.max_length``: the longest a micro-batch pads to)."""
    num_microbatches: int
    """Micro-batches per step on each data-parallel rank."""
    global_batch: int
    """Query groups per step (``trainer.global_batch_size``)."""
    total_params: int
    """Parameters of the whole model (every stage, unsharded; a tied output layer once)."""
    stages: list[StagePlan]
    layer_terms: list[Term]
    """One transformer layer's activation terms on one GPU (per token, this TP shard)."""
    step_flops: float
    """Model FLOPs of one step, forward + backward, all GPUs (megarank.training.flops)."""
    recompute_flops: dict[str, float] = field(default_factory=dict)
    """FLOPs a step spends again recomputing, per recompute mode (not model FLOPs)."""
    windows: int = 1
    """Sequences a document is read as (MaxP at training: ``data.train_passages``, every
    document planned at its most)."""
    token_budget: int | None = None
    """``data.tokens_per_micro_batch``: a micro-batch holds at most this many tokens, planned as
    budget / length sequences of ``length`` tokens (the most any mix of lengths can keep:
    linear terms follow the tokens, attention's quadratic ones are largest at full length)."""

    @property
    def sequences(self) -> float:
        """Sequences per micro-batch: groups x documents x windows, or the token budget's."""
        if self.token_budget:
            return self.token_budget / self.length
        return self.groups * self.documents * self.windows

    @property
    def largest(self) -> StagePlan:
        """The stage that needs the most memory per GPU under the config's choices."""
        return max(self.stages, key=lambda s: s.total(self.recompute, self.distributed_optimizer))

    def total(self, recompute: str | None = None, distributed_optimizer: bool | None = None) -> int:
        """Bytes per GPU of the largest stage (the config's choices unless given)."""
        r = self.recompute if recompute is None else recompute
        d = self.distributed_optimizer if distributed_optimizer is None else distributed_optimizer
        return max(s.total(r, d) for s in self.stages)
