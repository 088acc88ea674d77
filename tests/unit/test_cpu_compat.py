"""What the CPU compatibility layer enables, one test per megatron CUDA assumption it handles, and
a few real training steps with a ZeRO-1 optimizer and a checkpoint round trip on top of it.

Each test runs in a world of one gloo rank with megatron parallel state, i.e. exactly the state the
trainer runs in when its device is the CPU, on any host and twice: as on a machine without CUDA,
and with CUDA reported present and trainer.device=cpu (a CPU run on a GPU machine), where the
layer must still keep megatron off CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch


def _report_cuda(mp: pytest.MonkeyPatch, present: bool) -> None:
    """Make torch.cuda say CUDA is (or is not) present; a real device is left as it is."""
    if present and torch.cuda.is_available():
        return
    mp.setattr(torch.cuda, "is_available", lambda: present)
    mp.setattr(torch.cuda, "device_count", lambda: int(present))


@pytest.fixture(scope="module", params=["no_cuda", "cuda_present"])
def runtime(request):
    from megarank.parallel import cpu_compat
    from megarank.parallel.runtime import init_runtime, shutdown

    with pytest.MonkeyPatch.context() as mp:
        _report_cuda(mp, request.param == "cuda_present")
        try:
            yield init_runtime(tp=1, pp=1, seed=7, device="cpu")
        finally:
            # Process-global: leave no parallel state, process group or patched megatron behind.
            shutdown()
            cpu_compat.revert()


def test_applied_when_the_device_is_the_cpu(runtime):
    from megatron.core import utils
    from megatron.core.distributed import param_and_grad_buffer

    from megarank.parallel import cpu_compat, megatron

    assert cpu_compat.is_applied()
    assert runtime.device == torch.device("cpu")
    # Whatever the host reports, the patched modules see no CUDA and the CPU as current device.
    for module in (utils, param_and_grad_buffer):
        assert not module.torch.cuda.is_available() and module.torch.cuda.device_count() == 0
        assert module.torch.cuda.current_device() == "cpu"
    # torch's own Adam (no TE/apex here): the load fix is in place, on any device.
    assert megatron.apply_optimizer_fixes()


def test_revert_restores_megatron(runtime):
    # revert() puts back exactly what apply() replaced; apply() again is the same layer.
    from megatron.core import utils
    from megatron.core.optimizer import distrib_optimizer

    from megarank.parallel import cpu_compat

    patched_init = distrib_optimizer.DistributedOptimizer.__init__
    cpu_compat.revert()
    try:
        assert not cpu_compat.is_applied()
        assert utils.torch is torch
        assert distrib_optimizer.DistributedOptimizer.__init__ is patched_init.__wrapped__
    finally:
        cpu_compat.apply()
    assert cpu_compat.is_applied() and utils.torch is not torch


def test_rng_tracker_forks_the_cpu_generator(runtime):
    # (1) megatron's model-parallel RNG tracker: fork() gives a separate, reproducible stream
    # and leaves the default stream where it was.
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        c = torch.rand(4)
    assert torch.equal(b, c) and a.shape == b.shape


def test_global_memory_buffer_on_cpu(runtime):
    # (2) buffers megatron puts on torch.cuda.current_device().
    from megatron.core import parallel_state

    buf = parallel_state.get_global_memory_buffer().get_tensor((3, 5), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (3, 5)


def test_hardcoded_cuda_factories_land_on_cpu(runtime):
    # (5) device="cuda" factories in core.utils (used by grad-norm computation without apex).
    from megatron.core.utils import local_multi_tensor_l2_norm

    norm, _ = local_multi_tensor_l2_norm(0, None, [[torch.ones(4), torch.ones(5)]], False)
    assert norm.device.type == "cpu"
    assert norm.item() == pytest.approx(3.0)


def test_ddp_optimizer_step_and_grad_clipping(runtime):
    # (2, 3, 4, 5) megatron DDP grad buffers, grad sync, FP32 optimizer, clip_grad (whose CUDA
    # type assertion is replaced) and the norm accumulators, end to end on a real parallel layer.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                            use_cpu_initialization=True)

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(cfg)
            self.lin = ColumnParallelLinear(8, 8, config=cfg, init_method=cfg.init_method,
                                            bias=True)

        def forward(self, x):
            return self.lin(x)[0]

    torch.manual_seed(0)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), Net())
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.1, clip_grad=0.5), [ddp])
    w0 = ddp.module.lin.weight.detach().clone()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    (ddp(torch.randn(4, 8)) ** 2).sum().mul(100).backward()
    finalize_model_grads([ddp])
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0.5  # large grads: clipping is active
    assert not torch.equal(ddp.module.lin.weight, w0)
    assert ddp.module.lin.weight.device.type == "cpu"


def test_clip_grad_scales_in_place():
    # (4) the replacement keeps megatron's arithmetic: grads scaled by max_norm / (norm + 1e-6).
    from megarank.parallel.cpu_compat import _clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    _clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    q.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(TypeError):
        _clip_grad_by_total_norm_fp32([q], max_norm=1.0, total_norm=5.0)


def test_rotary_embedding_on_cpu(runtime):
    # (2) RotaryEmbedding moves its frequencies to torch.cuda.current_device().
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)(6)
    assert emb.device.type == "cpu" and emb.shape[0] == 6


def test_dist_checkpoint_save_and_load_on_cpu(runtime, tmp_path):
    # (2) dist_checkpointing's async saver synchronises CUDA before writing.
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    t = torch.arange(6.0)
    dist_checkpointing.save({"t": ShardedTensor.from_rank_offsets("t", t)}, str(tmp_path))
    out = dist_checkpointing.load(
        {"t": ShardedTensor.from_rank_offsets("t", torch.zeros(6))}, str(tmp_path)
    )
    assert torch.equal(out["t"], t)


# --- a few real steps: tiny GPT, megatron DDP + ZeRO-1, pipeline schedule, checkpoint round trip --

GROUP, ROWS, SEQ = 4, 8, 16  # 2 groups of 4 documents per micro-batch, 16 tokens each


def _stage(cfg, runtime):
    """A tiny cross-encoder on the CPU, wrapped as training wraps it, with its optimizer."""
    from megarank.models.build import build_cross_encoder, transformer_config
    from megarank.models.specs import select_kernels
    from megarank.parallel.megatron import build_optimizer, wrap_model
    from megarank.parallel.runtime import seed_everything

    seed_everything(cfg.trainer.seed)  # the same initial weights on every call
    kernels = select_kernels(cfg.trainer.kernels, runtime.device)
    assert kernels.name == "local"
    tconfig = transformer_config(cfg, runtime.device, kernels.name)
    model = build_cross_encoder(cfg, tconfig, kernels, True, True).to(runtime.device)
    ddp = wrap_model(model, tconfig, cfg.trainer.precision,
                     cfg.parallel.use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(cfg, ddp)
    return ddp, optimizer, scheduler


def _step(ddp, optimizer, scheduler, batch) -> float:
    """One optimizer step through megatron's schedule; the listwise loss of the batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids, mask, types, pool = batch

    def loss_func(scores):
        loss = torch.nn.functional.cross_entropy(  # the positive is document 0 of each group
            scores.float().view(-1, GROUP), torch.zeros(ROWS // GROUP, dtype=torch.long))
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        next(data_iterator)
        return model(ids, mask, types, pool), loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=ROWS, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    assert ok and math.isfinite(grad_norm) and grad_norm > 0
    return float(losses[0]["loss"])


def test_training_steps_zero1_and_resume(runtime, tmp_path):
    # (1-5 together) GPT stage with dropout through the RNG tracker, megatron DDP, the
    # DistributedOptimizer (ZeRO-1) and its checkpoint: the loss is finite and falls, the
    # optimizer's state is on the CPU, and a resumed step equals the uninterrupted one.
    from megatron.core.optimizer import DistributedOptimizer

    from megarank.checkpoint.sharded import load_checkpoint, save_checkpoint
    from megarank.config import compose

    cfg = compose(["model=gpt_tiny", "model.num_layers=2", "model.hidden_dropout=0.1",
                   "model.attention_dropout=0.1", "parallel.use_distributed_optimizer=true",
                   "trainer.device=cpu", "trainer.max_steps=10", "optim.lr=1e-3",
                   "optim.warmup_steps=0"])
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(5, 1000, (ROWS, SEQ), generator=g),
             torch.ones(ROWS, SEQ, dtype=torch.long), torch.zeros(ROWS, SEQ, dtype=torch.long),
             torch.full((ROWS,), SEQ - 1))

    ddp, optimizer, scheduler = _stage(cfg, runtime)
    inner = getattr(optimizer, "chained_optimizers", [optimizer])  # e.g. decay / no-decay groups
    assert inner and all(isinstance(o, DistributedOptimizer) for o in inner)
    losses = [_step(ddp, optimizer, scheduler, batch) for _ in range(4)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # one fixed batch: the loss must move down
    assert all(p.device.type == "cpu" for p in ddp.parameters())
    # megatron DDP's grad buffers (allocated on torch.cuda.current_device()) are on the CPU too.
    assert ddp.buffers and all(b.grad_data.device.type == "cpu" for b in ddp.buffers)
    states = [t for o in inner for s in o.optimizer.state.values() for t in s.values()
              if isinstance(t, torch.Tensor)]
    assert states and all(t.device.type == "cpu" for t in states)

    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, 4, ddp, optimizer, scheduler, {"step": 4}, runtime, {})
    expected = _step(ddp, optimizer, scheduler, batch)
    weights = [p.detach().clone() for p in ddp.parameters()]

    ddp2, optimizer2, scheduler2 = _stage(cfg, runtime)
    assert load_checkpoint(ckpts / "step_0000004", ddp2, optimizer2, scheduler2,
                           runtime) == {"step": 4, "rng_restored": True}
    # Every parameter holds its own Adam step after the load.
    steps = [s["step"] for o in getattr(optimizer2, "chained_optimizers", [optimizer2])
             for s in o.optimizer.state.values()]
    assert len({id(t) for t in steps}) == len(steps)
    assert _step(ddp2, optimizer2, scheduler2, batch) == pytest.approx(expected, abs=1e-6)
    for a, b in zip(weights, ddp2.parameters(), strict=True):
        torch.testing.assert_close(b.detach(), a, atol=1e-6, rtol=0)
