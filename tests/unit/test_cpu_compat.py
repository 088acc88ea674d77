"""What the CPU compatibility layer enables, one test per megatron CUDA assumption it handles.

Each test runs in a world of one gloo rank with megatron parallel state, i.e. exactly the state the
trainer runs in on a machine without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only layer")


@pytest.fixture(scope="module")
def runtime():
    from megarank.parallel.runtime import init_runtime, shutdown

    rt = init_runtime(tp=1, pp=1, seed=7, device="cpu")
    yield rt
    shutdown()


def test_applied_only_without_cuda(runtime):
    from megarank.parallel import cpu_compat

    assert cpu_compat.is_applied()
    assert runtime.device == torch.device("cpu")


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
