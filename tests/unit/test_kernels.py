"""Kernel selection: TE on CUDA when importable, megatron local layers + SDPA otherwise; fusions
only where their kernels exist. TE is mocked only at the selection boundary (te_available)."""

from __future__ import annotations

import pytest
import torch

from megarank.config import compose
from megarank.models import specs
from megarank.models.attention import SDPAttention
from megarank.models.build import transformer_config
from megarank.parallel.megatron import fusion_settings, use_fused_torch_adamw

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_cpu_selects_local_sdpa():
    choice = specs.select_kernels("auto", CPU)
    assert choice.name == "local" and "no CUDA" in choice.reason
    spec = specs.gpt_layer_spec("RMSNorm", False, choice.name)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    bert = specs.bert_layer_spec(choice.name)
    assert bert.submodules.self_attention.submodules.core_attention is SDPAttention


def test_cuda_without_te_selects_local(monkeypatch):
    monkeypatch.setattr(specs, "te_available", lambda: False)
    choice = specs.select_kernels("auto", CUDA)
    assert choice.name == "local" and "transformer_engine not installed" in choice.reason
    with pytest.raises(ValueError, match="transformer_engine is not installed"):
        specs.select_kernels("te", CUDA)


def test_cuda_with_te_selects_te(monkeypatch):
    monkeypatch.setattr(specs, "te_available", lambda: True)
    assert specs.select_kernels("auto", CUDA).name == "te"
    assert specs.select_kernels("te", CUDA).name == "te"
    assert specs.select_kernels("local", CUDA).name == "local"


def test_te_requested_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        specs.select_kernels("te", CPU)
    with pytest.raises(ValueError, match="trainer.kernels"):
        specs.select_kernels("fast", CPU)


def test_fusions_follow_device_and_kernels():
    cfg = compose(["model=gpt_tiny"])
    cpu = transformer_config(cfg, CPU, "local")
    assert not (cpu.bias_activation_fusion or cpu.bias_dropout_fusion or cpu.apply_rope_fusion
                or cpu.gradient_accumulation_fusion)
    assert cpu.use_cpu_initialization
    gpu = transformer_config(cfg, CUDA, "local")
    assert gpu.bias_activation_fusion and gpu.bias_dropout_fusion
    assert not gpu.apply_rope_fusion and not gpu.gradient_accumulation_fusion  # need TE kernels
    assert not gpu.use_cpu_initialization
    te = fusion_settings(CUDA, "te", cfg.model)
    assert te["apply_rope_fusion"] and te["gradient_accumulation_fusion"]
    assert not (te["masked_softmax_fusion"] or te["persist_layer_norm"])
    assert not fusion_settings(CPU, "te", cfg.model)["gradient_accumulation_fusion"]


def test_recompute_and_precision_reach_megatron():
    cfg = compose(["model=gpt_tiny", "trainer.recompute=full"])
    t = transformer_config(cfg, CPU)
    assert t.recompute_granularity == "full" and t.recompute_method == "uniform"
    cfg = compose(["model=gpt_tiny", "trainer.precision=bf16"])
    t = transformer_config(cfg, CPU)
    assert t.bf16 and t.params_dtype == torch.bfloat16


def test_sequence_parallel_needs_te_or_apex(monkeypatch):
    monkeypatch.setattr(specs, "apex_available", lambda: False)
    local = specs.KernelChoice("local", "no CUDA device")
    with pytest.raises(ValueError, match="parallel.sequence_parallel needs Transformer Engine"):
        specs.check_kernel_support(True, local)
    specs.check_kernel_support(False, local)
    specs.check_kernel_support(True, specs.KernelChoice("te", "TE"))
    monkeypatch.setattr(specs, "apex_available", lambda: True)
    specs.check_kernel_support(True, local)


def test_fused_adamw_for_fp32_params_equals_the_default_update():
    """fp32 main parameters (CPU here) step with torch's fused AdamW, which updates as the
    one-tensor-at-a-time form does (to 1e-6 over 5 steps); half-precision ones are left alone."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(5)]
    fused, plain = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False)
            for ps in (fused, plain)]
    holder = type("Megatron", (), {"optimizer": opts[0]})()
    assert use_fused_torch_adamw(holder)
    assert opts[0].param_groups[0]["fused"] and not opts[1].param_groups[0].get("fused")
    for step in grads:
        for params, opt in zip((fused, plain), opts, strict=True):
            for p, grad in zip(params, step, strict=True):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    half = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    assert not use_fused_torch_adamw(type("Megatron", (), {"optimizer": half})())


@pytest.mark.parametrize("native", [True, False])
def test_half_precision_on_a_cpu_without_native_matmuls_is_named(monkeypatch, native):
    """bf16 / fp16 on a CPU whose oneDNN lacks native half matmuls (AVX2: emulated, 48-71x
    slower than fp32 on a 2-core AMD EPYC, benchmarks/cpu_precision.py) is named with the
    field to change; native CPUs, fp32 and CUDA are quiet."""
    from megarank.parallel.runtime import cpu_half_precision_note

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: native)
    for precision in ("bf16", "fp16"):
        note = cpu_half_precision_note(precision, CPU)
        if native:
            assert note is None
        else:
            assert f"trainer.precision={precision}" in note and "trainer.precision=fp32" in note
        assert cpu_half_precision_note(precision, CUDA) is None
    assert cpu_half_precision_note("fp32", CPU) is None


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_stage_on_such_a_cpu_says_so_once(monkeypatch, caplog, native):
    """The note reaches the user: building the stage (train, score, serve and evaluate all do)
    logs it once as a warning on the megarank logger, and only where the CPU lacks native bf16."""
    import logging

    from megarank.bundle import build_bundle
    from megarank.config import compose

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    # An earlier run in this process may have pointed the logger at its own stream only.
    log = logging.getLogger("megarank")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    caplog.set_level(logging.WARNING, logger="megarank")
    with build_bundle(compose(["model=bert_tiny", "trainer.precision=bf16"]), load_hf=False,
                      device="cpu"):
        pass
    notes = [r for r in caplog.records
             if r.name == "megarank" and "on a CPU without native bf16 matmuls" in r.getMessage()]
    assert len(notes) == (0 if native else 1), [r.getMessage() for r in caplog.records]
    if not native:
        assert notes[0].levelno == logging.WARNING
        assert "trainer.precision=fp32 is the fast choice" in notes[0].getMessage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA megatron's fusions stay compiled")
def test_megatron_fusers_stay_plain_functions_without_cuda():
    """Without CUDA megatron's ``jit_fuser`` is its own no-op (megarank/__init__.py): its fusable
    functions are not wrapped in torch.compile at import (~3.4 s of every process's start)."""
    import megatron.core.jit as jit
    from megatron.core.fusions.fused_bias_gelu import bias_gelu

    assert jit.jit_fuser is jit.noop_decorator
    assert not hasattr(bias_gelu, "_torchdynamo_orig_callable")
