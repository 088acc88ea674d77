"""DoRA's weight norm || W + s B A || is formed once per optimizer step while training (the
weights change only at the step), not once per micro-batch: the same losses and gradient norms
as recomputing it every forward, with a quarter of the norm computations at four micro-batches."""

from __future__ import annotations

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.models import dora
from megarank.parallel.megatron import build_optimizer
from megarank.training.step import StepCounters, make_forward_step, train_step


def _two_steps(monkeypatch, cached: bool) -> tuple[list[float], list[float], int]:
    """Losses and gradient norms of two DoRA steps of four micro-batches, and how many
    weight norms were computed."""
    calls = []
    norm = dora.DoraAdapter.weight_norm
    monkeypatch.setattr(dora.DoraAdapter, "weight_norm",
                        lambda self, w: calls.append(1) or norm(self, w))
    if not cached:
        monkeypatch.setattr(dora.DoraAdapter, "training_norm", dora.DoraAdapter.weight_norm)
    cfg = compose(["model=gpt_tiny", "peft=dora", "pair.max_length=64",
                   "pair.max_query_length=8", "trainer.micro_batch_size=1",
                   "trainer.global_batch_size=4", "task.group_size=4", "optim.lr=1e-2"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        optimizer, scheduler = build_optimizer(cfg, bundle.model)
        c = bundle.collator
        q = c.tokenize_queries(["lift on a wing", "drag"])
        d = c.tokenize_documents(["the force on a wing", "a cone", "flow", "shock waves"] * 2)
        batches = iter([c.encode_tokens(q, d, [0] * 4 + [1] * 4, 4) for _ in range(8)])
        counters = StepCounters(model=cfg.model)
        forward_step = make_forward_step(cfg.task, bundle.runtime.device, counters)
        losses, norms = [], []
        calls.clear()
        for _ in range(2):
            counters.reset()
            stats, grad_norm, _, updated = train_step(
                get_forward_backward_func(), forward_step, batches, bundle.model, optimizer,
                scheduler, 4, 64, 8, counters, bundle.runtime)
            assert updated
            losses.append(stats["loss"])
            norms.append(grad_norm)
        adapters = sum(isinstance(m, dora.DoraAdapter) for m in bundle.model.modules())
    return losses, norms, len(calls) // adapters


def test_dora_norm_is_formed_once_per_step_and_trains_as_recomputed(monkeypatch):
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        loss_ref, norm_ref, per_adapter_ref = _two_steps(mp, cached=False)
    torch.manual_seed(0)
    loss, norm, per_adapter = _two_steps(monkeypatch, cached=True)
    assert per_adapter_ref == 8  # two steps x four micro-batches
    assert per_adapter == 2  # one a step
    assert loss[1] != loss[0]  # the second step sees the first one's update
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(loss_ref), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(norm), torch.tensor(norm_ref), rtol=1e-6, atol=0)
