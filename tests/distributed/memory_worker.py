"""Measure what recomputation and ZeRO-1 save, on models built in process as training builds them.

    python -m tests.distributed.memory_worker activations OUT.json [overrides...]
    torchrun --nproc_per_node 2 -m tests.distributed.memory_worker optimizer OUT.json [overrides...]

``main(argv)`` does the same in a process that runs it (``tests.helpers.runs.run_cli``, or a
``cli_case`` of ``tests.helpers.cases``).

``activations`` (one process): for trainer.recompute = none, selective and full, the bytes of the
tensors autograd saves for backward during one forward of one training micro-batch (model and
loss), seen through ``torch.autograd.graph.saved_tensors_hooks``. Tensors are counted once per
storage, so views of one buffer count once, and the model's parameters (saved by every linear
layer, but not activations) are left out. The gradients of each mode are compared with those of
``none``.

``optimizer`` (any number of ranks): for fp32 and bf16, each with the plain and the distributed
optimizer (parallel.use_distributed_optimizer), one training step, then the bytes of this rank's
optimizer state: Adam's exp_avg and exp_avg_sq, and the fp32 main parameters where they are
copies (bf16), not the model's own weights.

Rank 0 writes one JSON object to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.parallel.megatron import build_optimizer
from megarank.parallel.runtime import shutdown
from megarank.training.setup import build_data
from megarank.training.step import StepCounters, make_forward_step, train_step

RECOMPUTE = ("none", "selective", "full")
OPTIMIZERS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_activation_bytes(bundle, batch) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(bytes, tensors) autograd saves during one forward of ``batch``, and the gradients."""
    model = bundle.model
    weights = {_storage(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        ptr, nbytes = _storage(t)
        if ptr and ptr not in weights:
            saved[ptr] = nbytes
            count += 1
        return t  # keeps the storage alive, so no address is reused during the forward

    model.train()
    model.zero_grad_buffer()
    forward_step = make_forward_step(bundle.cfg.task, bundle.runtime.device, StepCounters())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scores, loss_func = forward_step(iter([batch]), model)
        loss, _ = loss_func(scores)
    loss.backward()
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    return sum(saved.values()), count, grads


def optimizer_state_bytes(optimizer, model) -> dict[str, int]:
    """This rank's Adam moments and the fp32 main parameters that are copies of the weights."""
    weights = {_storage(p)[0] for p in model.parameters()}
    moments = main = params = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer  # the torch AdamW megatron steps
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    moments += state[key].numel() * state[key].element_size()
                params += p.numel()
                if _storage(p)[0] not in weights:  # a separate fp32 copy, not a model weight view
                    main += p.numel() * p.element_size()
    return {"moments": moments, "main_params": main, "total": moments + main,
            "optimized_elements": params}


def measure_activations(overrides: list[str]) -> dict:
    out: dict = {}
    ref = None
    for mode in RECOMPUTE:
        bundle = build_bundle(compose([*overrides, f"trainer.recompute={mode}"]), load_hf=False)
        _, batches = build_data(bundle.cfg, bundle.runtime, bundle.collator, 0)
        batch = next(batches)[0]  # the first step's first micro-batch
        nbytes, count, grads = saved_activation_bytes(bundle, batch)
        if ref is None:
            ref = grads
        diff = max(float((grads[n] - ref[n]).abs().max()) for n in ref)
        out[mode] = {"bytes": nbytes, "tensors": count, "max_grad_diff_vs_none": diff,
                     "batch_shape": list(batch.input_ids.shape)}
        del bundle, grads, batches  # the process group stays up for the next build
    for mode in RECOMPUTE:
        out[mode]["ratio_vs_none"] = out[mode]["bytes"] / out["none"]["bytes"]
    return out


def measure_optimizer(overrides: list[str]) -> dict:
    out: dict = {}
    for precision, zero1 in OPTIMIZERS:
        cfg = compose([*overrides, f"trainer.precision={precision}",
                       f"parallel.use_distributed_optimizer={str(zero1).lower()}"])
        bundle = build_bundle(cfg, load_hf=False)
        optimizer, scheduler = build_optimizer(bundle.cfg, bundle.model)
        _, batches = build_data(bundle.cfg, bundle.runtime, bundle.collator, 0)
        forward_step = make_forward_step(bundle.cfg.task, bundle.runtime.device, StepCounters())
        d = bundle.derived
        _, grad_norm, _, _ = train_step(get_forward_backward_func(), forward_step,
                                     iter(next(batches)),
                                     bundle.model, optimizer, scheduler, d.num_microbatches,
                                     bundle.cfg.pair.max_length, d.pairs_per_micro_batch)
        row = optimizer_state_bytes(optimizer, bundle.model)
        row["grad_norm"] = grad_norm
        row["model_params"] = sum(p.numel() for p in bundle.model.parameters())
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, row)
        out[f"{precision}/{'zero1' if zero1 else 'plain'}"] = per_rank
        del bundle, optimizer, scheduler, batches
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    mode, path, overrides = argv[0], Path(argv[1]), argv[2:]
    result = measure_activations(overrides) if mode == "activations" else \
        measure_optimizer(overrides)
    if dist.get_rank() == 0:
        path.write_text(json.dumps(result, indent=1))
    dist.barrier()
    shutdown()


# megatron's checkpoint code may start processes with `spawn`, which re-imports __main__.
if __name__ == "__main__":
    main()
