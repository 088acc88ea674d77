"""Host waits in the training step. On a GPU every read of a device value on the host (item,
tolist, bool, float) stalls the CPU until the GPU has caught up; the CPU proxy counts the reads
made outside torch itself, and every read of torch's optimizer (megarank steps fused AdamW,
which reads nothing; the default form reads each parameter's step count)."""

from __future__ import annotations

import collections
import traceback
from types import SimpleNamespace

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.overrides import TorchFunctionMode

from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.parallel.megatron import (
    _foreach_l2_norm,
    _foreach_scale,
    build_optimizer,
    grads_finite_tensor,
)
from megarank.training.step import StepCounters, make_forward_step, train_step

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Counts tensor reads by the file and line outside torch that made them (torch's own
    optimizer counted at its line)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            stack = traceback.extract_stack()[:-1]
            frames = [f for f in stack
                      if "/torch/" not in f.filename or "/torch/optim/" in f.filename]
            if frames:
                self.sites[f"{frames[-1].filename}:{frames[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))


def test_clipping_norm_and_scale_equal_megatrons_fallbacks():
    """The foreach norm and scale compute what megatron's pure-Python fallbacks compute."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) for n in (3, 70, 1, 512)]
    ours, _ = _foreach_l2_norm(0, None, [tensors], False)
    ref = torch.linalg.vector_norm(torch.cat(tensors))
    assert ours.shape == (1,)
    torch.testing.assert_close(ours[0], ref, rtol=1e-6, atol=0)
    scaled = [t.clone() for t in tensors]
    _foreach_scale(0, None, [scaled, scaled], 0.25)
    for a, b in zip(scaled, tensors, strict=True):
        torch.testing.assert_close(a, b * 0.25)
    out = [torch.empty_like(t) for t in tensors]
    _foreach_scale(0, None, [tensors, out], 2.0)
    for a, b in zip(out, tensors, strict=True):
        torch.testing.assert_close(a, b * 2.0)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_training_step_reads_the_device_twice(packing):
    """One read for the step's reduced numbers (loss, counts, the finite check), one for the
    gradient norm that clipping decides on; none per micro-batch or per gradient tensor."""
    cfg = compose(["model=gpt_tiny", "pair.max_length=64", "pair.max_query_length=8",
                   "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
                   "task.group_size=4", f"data.packing={str(packing).lower()}"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        assert clip_grads.l2_norm_impl is not mcore_utils.local_multi_tensor_l2_norm
        optimizer, scheduler = build_optimizer(cfg, bundle.model)
        c = bundle.collator
        q = c.tokenize_queries(["lift on a wing", "drag"])
        d = c.tokenize_documents(["the force on a wing", "a cone", "flow", "shock waves"] * 2)
        batches = iter([c.model_layout(c.encode_tokens(q, d, [0] * 4 + [1] * 4, 4))
                        for _ in range(8)])
        counters = StepCounters(model=cfg.model)
        forward_step = make_forward_step(cfg.task, bundle.runtime.device, counters)
        run = get_forward_backward_func()
        train_step(run, forward_step, batches, bundle.model, optimizer, scheduler, 4, 64, 8,
                   counters, bundle.runtime)
        reads = HostReads()
        counters.reset()
        with reads:
            stats, norm, _, updated = train_step(run, forward_step, batches, bundle.model,
                                                 optimizer, scheduler, 4, 64, 8, counters,
                                                 bundle.runtime)
    assert updated and stats["finite"] and norm > 0
    assert sum(reads.sites.values()) == 2, reads.sites


def test_the_gradient_finite_check_finds_every_non_finite_value():
    """One sum per gradient buffer (no bool per gradient): a NaN, +inf or -inf anywhere in any
    buffer, fp32 or bf16, makes the step not finite; large finite values of both signs do not."""

    def model(*grads):
        return SimpleNamespace(buffers=[SimpleNamespace(grad_data=g) for g in grads])

    for dtype in (torch.float32, torch.bfloat16):
        finite = torch.linspace(-1e30, 1e30, 10_001).to(dtype)
        assert bool(grads_finite_tensor(model(finite, finite.clone())))
        for bad in (float("nan"), float("inf"), float("-inf")):
            poisoned = finite.clone()
            poisoned[7_777] = bad
            assert not bool(grads_finite_tensor(model(finite, poisoned))), (dtype, bad)
        both = finite.clone()
        both[0], both[1] = float("inf"), float("-inf")  # sums to NaN, not to a finite value
        assert not bool(grads_finite_tensor(model(both)))
