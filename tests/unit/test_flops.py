"""FLOP accounting: hand counts on tiny configs, Megatron-LM's formula, and the peak-TFLOPS table."""

from __future__ import annotations

import pytest

from megarank.config import compose
from megarank.config.schema import ModelConfig
from megarank.training.flops import (
    PEAK_BF16_DENSE_TFLOPS,
    forward_flops_breakdown,
    forward_flops_per_sequence,
    mfu,
    peak_tflops,
    step_flops,
    train_flops_per_sequence,
)


def _cfg(family: str = "gpt", layers: int = 4, h: int = 64, heads: int = 4,
         groups: int | None = None, head_dim: int | None = None, ffn: int = 256,
         gated: bool = False, vocab: int = 1000) -> ModelConfig:
    return ModelConfig(name="t", family=family, num_layers=layers, hidden_size=h,
                       num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim,
                       ffn_hidden_size=ffn, vocab_size=vocab, gated_linear_unit=gated)


def test_tiny_mha_by_hand():
    # h=64, L=4, 4 heads of d=16, plain MLP with ffn=256, s=16.
    cfg = _cfg()
    qkv = 2 * 16 * 64 * (4 * 16 + 2 * 4 * 16)  # 2*s*h*3h  = 393,216
    scores = 2 * 16 * 16 * 4 * 16  # QK^T 2*s*s*nq*d = 32,768
    av = 2 * 16 * 16 * 4 * 16  # AV: the same = 32,768
    out = 2 * 16 * 64 * 64  # 131,072
    mlp = 2 * 16 * 64 * 256 * 2  # up + down = 1,048,576
    layer = qkv + scores + av + out + mlp  # 1,638,400
    head = 2 * 64  # Linear(64, 1) on the last token
    assert layer == 1_638_400
    assert forward_flops_per_sequence(cfg, 16) == 4 * layer + head
    assert train_flops_per_sequence(cfg, 16) == 3 * (4 * layer + head)
    parts = forward_flops_breakdown(cfg, 16)
    assert parts["attention"] == 4 * (scores + av) and parts["output_layer"] == 0


def test_gqa_gated_and_explicit_head_dim():
    # Qwen3-like: h=64, 8 query heads of d=32 (8*32=256 != h), 2 KV groups, SwiGLU ffn=128, L=2.
    cfg = _cfg(layers=2, heads=8, groups=2, head_dim=32, ffn=128, gated=True)
    s = 16
    qkv = 2 * s * 64 * (8 * 32 + 2 * 2 * 32)  # queries 256 wide, keys and values 64 wide each
    attn = 2 * (2 * s * s * 8 * 32)  # every query head attends, whatever the group count
    out = 2 * s * (8 * 32) * 64  # [s, 256] x [256, 64]
    mlp = 2 * s * 64 * 128 * 3  # gate, up, down
    assert forward_flops_per_sequence(cfg, s) == 2 * (qkv + attn + out + mlp) + 2 * 64


def test_bert_pooler_and_bidirectional():
    cfg = _cfg(family="bert")
    gpt = _cfg(family="gpt")
    # Same backbone; BERT adds the pooler Linear(h, h) (2*h*h) and a score Linear(h, 1) (2*h).
    diff = forward_flops_per_sequence(cfg, 16) - forward_flops_per_sequence(gpt, 16)
    assert diff == 2 * 64 * 64
    assert forward_flops_breakdown(cfg, 16)["head"] == 2 * 64 * 64 + 2 * 64
    # An encoder always counts the full s x s, even when asked for the causal half.
    assert forward_flops_per_sequence(cfg, 16, causal_half=True) == forward_flops_per_sequence(
        cfg, 16)


def test_causal_half_option():
    cfg = _cfg()
    full = forward_flops_breakdown(cfg, 16)["attention"]
    half = forward_flops_breakdown(cfg, 16, causal_half=True)["attention"]
    assert half == full / 2
    # causal=False overrides the family: a decoder run bidirectionally counts the full square.
    assert forward_flops_breakdown(cfg, 16, causal=False, causal_half=True)["attention"] == full


def test_yes_no_vs_full_vocab():
    cfg = _cfg(vocab=1000)
    s, h, v = 16, 64, 1000
    yes_no = train_flops_per_sequence(cfg, s, head="yes_no")
    full = train_flops_per_sequence(cfg, s, head="yes_no", full_vocab_head=True)
    assert full - yes_no == 2 * s * h * v * 3
    # yes/no reads two output-layer rows: [h] x [h, 2]; the classifier one: [h] x [h, 1].
    assert forward_flops_breakdown(cfg, s, head="yes_no")["head"] == 2 * h * 2
    with pytest.raises(ValueError, match="head"):
        forward_flops_per_sequence(cfg, s, head="lm")


def test_step_sums_sequences():
    cfg = _cfg()
    one = train_flops_per_sequence
    assert step_flops(cfg, [16, 16, 32]) == 2 * one(cfg, 16) + one(cfg, 32)
    assert step_flops(cfg, 16, num_sequences=8) == 8 * one(cfg, 16)
    assert step_flops(cfg, [16], training=False) == forward_flops_per_sequence(cfg, 16)


@pytest.mark.parametrize("layers,h,s", [(24, 1024, 2048), (32, 4096, 2048), (96, 12288, 2048),
                                        (4, 64, 16)])
def test_megatron_formula(layers, h, s):
    # Narayanan et al. 2021, eq. 3: a GPT step costs 72*B*s*L*h^2*(1 + s/(6h) + V/(12hL)).
    # Without the vocabulary term, per token: 72*L*h^2*(1 + s/(6h)). MHA, plain 4h MLP.
    cfg = _cfg(layers=layers, h=h, heads=h // 64, ffn=4 * h)
    parts = forward_flops_breakdown(cfg, s)
    backbone = 3 * (sum(parts.values()) - parts["head"] - parts["output_layer"])
    expected = 72 * layers * h**2 * (1 + s / (6 * h))
    assert backbone / s == pytest.approx(expected, rel=1e-9)


def test_qwen2_7b_matches_published_parameter_count():
    # Qwen2.5-7B's model card: 6.53B non-embedding parameters. At s=1 the attention term is
    # negligible, so training FLOPs per token ~ 6 x the matmul parameters (norms, biases ~0.3M).
    model = compose(["experiment=qwen2_7b_tp4_pp2"]).model
    per_token = train_flops_per_sequence(model, 1)
    assert per_token / 6 == pytest.approx(6.53e9, rel=5e-3)


@pytest.mark.parametrize("name,peak,key", [
    ("NVIDIA H100 80GB HBM3", 989.4, "H100"),  # the SXM5 part's name
    ("NVIDIA H100 PCIe", 756.0, "H100 PCIe"),
    ("NVIDIA H100 NVL", 835.0, "H100 NVL"),
    ("NVIDIA H100 SXM", 989.4, "H100 SXM"),
    ("NVIDIA H200", 989.4, "H200"),
    ("NVIDIA H200 NVL", 835.0, "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", 312.0, "A100"),
    ("NVIDIA A100 80GB PCIe", 312.0, "A100"),
    ("NVIDIA A10", 125.0, "A10"),
    ("NVIDIA L40S", 362.05, "L40S"),
    ("NVIDIA L4", 121.0, "L4"),
    ("NVIDIA B200", 2250.0, "B200"),
])
def test_peak_lookup(name, peak, key):
    assert peak_tflops(name) == (peak, key)


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA A10G", "NVIDIA GeForce RTX 4090", "cpu",
                                  "NVIDIA GH200 480GB", ""])
def test_unknown_device(name):
    # Whole-word matching: an L40 is not an L4, an A10G not an A10.
    assert peak_tflops(name) is None
    assert mfu(1e14, name) is None


def test_mfu():
    util, key = mfu(494.7e12, "NVIDIA H100 80GB HBM3")
    assert key == "H100" and util == pytest.approx(0.5)
    assert set(PEAK_BF16_DENSE_TFLOPS) >= {"H100 SXM", "H100 PCIe", "H100 NVL", "H200", "A100",
                                            "L40S", "L4", "A10", "B200"}
