"""megarank's glue to megatron-core: wrapping, the optimizer, fusion switches and the
optimizer-state fixes its checkpoints need.

Written for megatron-core 0.16.1 (tested; the version Python 3.11 resolves) and kept to what the
``>=0.16.1,<0.20`` range in pyproject.toml allows (the optimizer and checkpoint behaviour worked
around below was also seen with 0.19.2). Everything that depends on how a given megatron-core
release wraps, optimizes, fuses or checkpoints lives here, so that an upgrade is one file to
read. What each piece is for:

- :func:`wrap_model`, :func:`build_optimizer`, ``DTYPES``: Float16Module + DDP with the schedule
  hooks (``finalize_model_grads_func``, ``no_sync_func``, ``grad_scale_func``), megatron's Adam
  and its LR scheduler. :func:`finalize_grads` first sums, over the pipeline stages, the
  gradients of parameters every stage holds a copy of (``pipeline_shared``: DeBERTa's
  relative-position table), which megatron's embedding-group reduction does not know.
- :func:`fusion_settings`: megatron's fusions that need CUDA (its jit bias+GeLU/SwiGLU and
  bias+dropout+add) or Transformer Engine kernels (RoPE, weight-grad accumulation) are on only
  where those exist; CPU weight initialisation off the GPU.
- :func:`use_fused_torch_adamw`: without TE or apex megatron steps torch's AdamW in its foreach
  form; on CUDA torch's fused kernel does the same update faster.
- :func:`optimizer_sharding_metadata`: the DistributedOptimizer's default checkpoint sharding
  raises "ShardedTensor.flattened_range is not supported"; ``fully_reshardable`` works on every
  layout.
- :func:`prepare_optimizer_for_load`: a fresh DistributedOptimizer without TE/apex has no Adam
  state, and its ``state_dict()`` asserts ``len(steps) == 1``.
- :func:`apply_optimizer_fixes`: without TE/apex the fully-reshardable load raises
  ``KeyError: 'step'`` (the torch Adam state holds a ``step`` the checkpoint keeps elsewhere).
- :func:`separate_adam_steps`: without TE/apex a loaded optimizer shares ONE ``step`` tensor
  between all parameters, and a resumed run silently diverges.
- :func:`in_process_write_results`: a synchronous save without the writer's spawned Manager
  process (seconds of start-up on every run's first save).

The CUDA assumptions megatron makes when the run's device is the CPU are handled apart, in
:mod:`megarank.parallel.cpu_compat`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from omegaconf import DictConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fusion_settings(device: torch.device, kernels: str, model_cfg: Any) -> dict[str, bool]:
    """TransformerConfig's fusion and initialisation switches for ``device`` and ``kernels``
    (``"te"`` or ``"local"``); ``model_cfg`` is the model group (gated_linear_unit,
    add_bias_linear).

    Fused kernels only where they exist (CUDA); each has a plain-PyTorch equivalent otherwise.
    bias+GeLU/SwiGLU and bias+dropout+add are megatron's jit fusions; RoPE and weight-grad
    accumulation fusions need Transformer Engine's kernels.
    """
    on_gpu = device.type == "cuda"
    return dict(
        # Nothing to fuse without a bias or a gate.
        bias_activation_fusion=on_gpu and bool(model_cfg.gated_linear_unit
                                               or model_cfg.add_bias_linear),
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,  # SDPA / TE attention do their own
        apply_rope_fusion=on_gpu and kernels == "te",
        persist_layer_norm=False,  # apex's persistent LayerNorm kernel
        gradient_accumulation_fusion=on_gpu and kernels == "te",
        # Off the GPU, initialise full weights on the CPU and split them: the same seed gives the
        # same full weights for every TP size (megatron's GPU path allocates on the current CUDA
        # device).
        use_cpu_initialization=not on_gpu,
    )


def wrap_model(model: torch.nn.Module, tconfig: TransformerConfig, precision: str,
               use_distributed_optimizer: bool) -> DistributedDataParallel:
    """``model`` (already on its device) in megatron's Float16Module (bf16/fp16) and DDP, with
    the schedule hooks that reduce gradients set on ``tconfig``."""
    if precision != "fp32":
        # bf16/fp16 weights and activations; the optimizer keeps fp32 main weights.
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision != "fp32",
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    # The schedules reduce grads across DP (and embedding groups) through this hook, and skip the
    # DP all-reduce on all but the last micro-batch through no_sync.
    tconfig.finalize_model_grads_func = finalize_grads
    tconfig.no_sync_func = ddp.no_sync
    return ddp


def finalize_grads(model: list[torch.nn.Module], *args: Any, **kwargs: Any) -> Any:
    """megatron's ``finalize_model_grads``, after summing the ``pipeline_shared`` parameters'
    gradients over the pipeline stages. Summed before the data-parallel reduction (which it
    commutes with), so a distributed optimizer's reduce-scatter sees whole gradients."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        import torch.distributed as dist

        group = ps.get_pipeline_model_parallel_group()
        for chunk in model:
            for p in chunk.parameters():
                if getattr(p, "pipeline_shared", False) and p.requires_grad:
                    dist.all_reduce(p.main_grad, group=group)
    return finalize_model_grads(model, *args, **kwargs)


def build_optimizer(cfg: DictConfig, model: DistributedDataParallel) -> tuple[Any, Any]:
    """megatron's AdamW (weight decay off for biases and norms) and its LR scheduler."""
    o, trainer = cfg.optim, cfg.trainer
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=trainer.precision == "bf16", fp16=trainer.precision == "fp16",
        params_dtype=DTYPES[trainer.precision],
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        loss_scale=o.loss_scale, initial_loss_scale=o.initial_loss_scale,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    use_fused_torch_adamw(optimizer)
    # fp16: the schedules multiply the loss by the current loss scale before backward.
    model.config.grad_scale_func = optimizer.scale_loss if trainer.precision == "fp16" else None
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=trainer.max_steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=trainer.max_steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


def use_fused_torch_adamw(optimizer: Any) -> bool:
    """Without TE or apex, megatron steps with torch's AdamW in its default form: foreach on
    CUDA, one tensor at a time on the CPU, and both read every parameter's step count on the host
    (an ``item()`` per parameter tensor a step). torch's fused kernel (CUDA, and the CPU since
    torch 2.4) does the same update in one call per device with no host read (equal to 1e-6:
    tests/unit/test_kernels.py; 2 host reads a step: tests/unit/test_host_syncs.py). Returns
    whether it was switched on.
    """
    switched = False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW | torch.optim.Adam):
            continue  # TE / apex FusedAdam
        params = [p for g in inner.param_groups for p in g["params"]]
        if params and all(p.device.type in ("cuda", "cpu") and p.dtype == torch.float32
                          for p in params):
            for g in inner.param_groups:
                g["fused"], g["foreach"] = True, False
            switched = True
    return switched


def optimizer_sharding_metadata() -> dict[str, str]:
    """``metadata`` for the optimizer's ``sharded_state_dict`` on both save and load.

    The DistributedOptimizer's default checkpoint sharding cannot be written by megatron-core
    0.16 on every layout ("ShardedTensor.flattened_range is not supported");
    ``fully_reshardable`` writes on any layout and loads into any other.
    """
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def prepare_optimizer_for_load(optimizer: Any) -> None:
    """Give a fresh distributed optimizer the Adam state a checkpoint is loaded into.

    Without apex or Transformer Engine, megatron's DistributedOptimizer.state_dict() reads the
    step from the (still empty) torch Adam state and fails (``len(steps) == 1``). One zero-gradient
    step creates the state; the load overwrites it, and the main weights it touched, right after.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def separate_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load.

    Without apex or Transformer Engine, megatron's optimizer load gives all parameters ONE step
    tensor; torch's Adam increments it in place once per parameter per step, so bias correction
    drifts and a resumed run diverges silently. Copies make each parameter's step its own, as in
    an uninterrupted run. A no-op for optimizers whose state holds no step tensor (TE/apex).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for state in torch_opt.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()


def _keep_adam_step(fn: Any) -> Any:
    """DistributedOptimizer's fully-reshardable load copies every key of a parameter's Adam state
    from the checkpoint. torch's Adam (megatron's choice without apex or Transformer Engine) holds
    a ``step`` there, which the checkpoint keeps in the param groups instead: KeyError 'step'.
    The step is restored from the param groups; here it is set aside while the tensors are
    copied."""

    @functools.wraps(fn)
    def wrapper(self: Any, model_param: Any, tensors: dict[str, Any]) -> Any:
        precision_aware = getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8",
                                  False)
        if "step" in tensors or precision_aware:
            return fn(self, model_param, tensors)
        group, order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
        step = state.pop("step", None)
        try:
            return fn(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    wrapper.keeps_adam_step = True
    return wrapper


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's multi_tensor_l2norm contract ([1] float32 norm of every tensor, None) with one
    foreach kernel and no host sync. megatron's own fallback (no apex, no TE) builds the total
    from a Python list of per-tensor norms: one device-to-host copy per gradient tensor, a few
    hundred waits a step for a 0.5B model."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's multi_tensor_scale contract (dst = src * scale) in foreach kernels; in place
    when source and destination are the same tensors (gradient clipping)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(a is b for a, b in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def apply_sync_free_clipping() -> bool:
    """Where megatron clips gradients with its pure-Python fallbacks (neither apex nor TE is
    installed), use :func:`_foreach_l2_norm` and :func:`_foreach_scale` instead: the same
    numbers, one host wait a step (the total norm clipping decides on) instead of one per
    gradient tensor. Idempotent; returns whether the fallbacks were replaced."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl in (mcore_utils.local_multi_tensor_l2_norm, _foreach_l2_norm):
        clip_grads.l2_norm_impl = _foreach_l2_norm
        clip_grads.multi_tensor_scale_impl = _foreach_scale
        return True
    return False


def apply_optimizer_fixes() -> bool:
    """Patch megatron's DistributedOptimizer for loading into torch's Adam: see
    :func:`_keep_adam_step`. Only when megatron runs without TE's or apex's FusedAdam, whatever the
    device (a GPU machine without them hits the same error). Idempotent; returns whether the fix
    is in place. Also :func:`apply_sync_free_clipping`."""
    apply_sync_free_clipping()
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False):
        return False  # FusedAdam keeps no per-parameter step: nothing to fix
    cls = distrib_optimizer.DistributedOptimizer
    current = cls._set_main_param_and_optimizer_states
    if not getattr(current, "keeps_adam_step", False):
        cls._set_main_param_and_optimizer_states = _keep_adam_step(current)
    return True


def grads_finite_tensor(model: DistributedDataParallel) -> torch.Tensor:
    """A 0-d bool tensor on the gradients' device: whether this rank's gradient buffers hold only
    finite values (before the optimizer step). No host sync: the caller reads it with the step's
    other numbers.

    megatron's DDP keeps every gradient in a few flat buffers (``grad_data``); fp32 and bf16
    optimizers step whatever is there (only fp16's loss scaler checks), so a NaN would reach the
    weights. One reduction per buffer: a sum, which is finite exactly when every value is, short
    of finite values whose sum passes the float range (~3e38 in fp32 and bf16), which also
    counts as not finite. ``isfinite(g).all()`` writes a bool per gradient first and read
    0.1 s a step on MiniLM's 22.7M gradients on one CPU thread, the sum 7 ms.
    """
    buffers = list(getattr(model, "buffers", [])) + list(
        getattr(model, "expert_parallel_buffers", []))
    grads = [b.grad_data for b in buffers] or [p.grad for p in model.parameters()
                                                if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(g.sum(dtype=torch.float32)) for g in grads]).all()


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every rank's weights are finite (one all-reduce): checked before each save."""
    bad = any(not bool(torch.isfinite(p).all()) for p in model.parameters())
    device = next(model.parameters()).device
    flag = torch.tensor([float(bad)], device=device if device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


@contextlib.contextmanager
def in_process_write_results() -> Iterator[None]:
    """For a synchronous save: megatron's checkpoint writer hands each rank's write results back
    through a queue served by a ``multiprocessing`` Manager, started with the spawn method, so
    that an asynchronous save (written in another process) can reach it. Its first save waits
    for a new Python to start and, unpickling the results, to import torch: ~3 s of a 6 s save
    of MiniLM here, and the Manager's shutdown at exit. A synchronous save writes, and reads
    the results back, in this process: a plain queue serves it. Only for the save's duration,
    so an asynchronous save in the same process still gets megatron's own queue."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = saved


def async_save_queue() -> Any:
    """megatron's queue of asynchronous checkpoint saves (``trainer.async_save``): the tensors
    go to a writer process, and ``maybe_finalize_async_calls`` completes the saves whose writes
    every rank has finished. The writer starts with multiprocessing's spawn method, so an entry
    script must guard its main with ``if __name__ == "__main__"``."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue()
