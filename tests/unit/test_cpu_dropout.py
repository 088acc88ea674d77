"""Dropout on the CPU with 16-bit random numbers (megarank.models.dropout): attention dropout
through ``megarank.models.attention.attend`` instead of SDPA's math kernel (a 32-bit draw per
probability, ~9x the attention's own time on one thread), and the layers' residual dropout. The
masking (padding, causal, grouped queries, additive bias) equals SDPA's, the dropout is unbiased
at the configured rate, and the backward is autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megarank.models import attention
from megarank.models.attention import attend
from megarank.models.dropout import dropout, get_bias_dropout_add, kept_mask, times_kept


def _qkv(b=3, h=4, kv_heads=4, s=9, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, kv_heads, s, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _key_padding(b=3, s=9):
    allowed = torch.ones(b, 1, 1, s, dtype=torch.bool)
    allowed[0, ..., s - 3:] = False
    allowed[b - 1, ..., 3:] = False
    return allowed


@pytest.mark.parametrize("case", ["padding", "causal", "causal+padding", "gqa", "bias"])
def test_the_dropout_path_masks_as_sdpa_does(case):
    """At rate 0 the CPU dropout path is SDPA's attention exactly (1e-6 in fp32)."""
    q, k, v = _qkv(kv_heads=2 if case == "gqa" else 4)
    kwargs = dict(attn_mask=None, is_causal=False, enable_gqa=case == "gqa", scale=0.3)
    if "padding" in case or case == "gqa":
        kwargs["attn_mask"] = _key_padding()
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "causal+padding":
        kwargs["attn_mask"] = torch.ones(9, 9, dtype=torch.bool).tril() & _key_padding()
    if case == "bias":
        kwargs["attn_mask"] = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    ours = attention._dropout_attention(q, k, v, kwargs["attn_mask"], 0.0, kwargs["scale"],
                                        kwargs["is_causal"], kwargs["enable_gqa"])
    ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, **kwargs)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_dropout_mask_drops_at_the_rate_asked():
    kept, rate = kept_mask((64, 12, 128, 128), 0.1)
    assert abs(rate - 0.1) < 1 / 65536
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002  # 12.6M draws: sd ~1e-4
    kept, rate = kept_mask((5, 7), 0.0)
    assert rate == 0.0 and kept.all()


def test_times_kept_is_the_product_with_the_mask_and_saves_it_as_bool():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    kept = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = times_kept(x, kept)
    assert torch.equal(out, x * kept) and [t.dtype for t in saved] == [torch.bool]
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, kept.double())


def test_a_row_with_every_key_masked_attends_uniformly():
    """Causal and padding together (one bias, not two): the first query of a row whose first
    key is padding may attend to nothing; it averages the values instead of turning NaN, and
    every other row is unchanged by the mask (equal to SDPA's)."""
    q, k, v = _qkv(kv_heads=4)
    allowed = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    allowed[1, ..., 0] = False  # query 0 of row 1 sees only key 0: masked
    allowed[1, ..., 5] = False  # masked twice for query 0 (padding, and after it)
    out = attention._dropout_attention(q, k, v, allowed, 0.0, 0.3, True, False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, :, 0], v[1].mean(dim=1), rtol=1e-6, atol=1e-6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & torch.ones(
        9, 9, dtype=torch.bool).tril(), scale=0.3)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1, :, 1:], ref[1, :, 1:], rtol=1e-6, atol=1e-6)


def test_attention_dropout_is_unbiased_and_its_backward_is_exact():
    """The mean over many draws approaches the output without dropout (each probability kept
    with 1 - p and scaled by 1 / (1 - p)); with the draw fixed, gradcheck in float64."""
    q, k, v = _qkv(b=2, h=2, kv_heads=2, s=6, d=4)
    mask = _key_padding(b=2, s=6)
    clean = attend(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.5)
    torch.manual_seed(0)
    mean = torch.stack([attend(q, k, v, attn_mask=mask, dropout_p=0.3, scale=0.5)
                        for _ in range(4000)]).mean(0)
    assert (mean - clean).abs().max().item() < 0.05
    assert (attend(q, k, v, attn_mask=mask, dropout_p=0.3, scale=0.5) - clean).abs().max() > 0.1

    def fixed_draw(q, k, v):
        torch.manual_seed(1)
        return attend(q, k, v, attn_mask=mask, dropout_p=0.3, scale=0.5)

    inputs = tuple(t.double().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(fixed_draw, inputs)


def test_cpu_attention_dropout_does_not_use_sdpa(monkeypatch):
    """The point of the path: with dropout on the CPU, SDPA (and its 32-bit draws) is not
    called; without dropout it is."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = attend(q, k, v, attn_mask=_key_padding(), dropout_p=0.1, scale=0.3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and calls == []
    attend(q, k, v, attn_mask=_key_padding(), dropout_p=0.0, scale=0.3)
    assert calls == [0.0]


def test_residual_dropout_is_dropout_at_the_rate_with_the_kept_values_scaled(monkeypatch):
    """The layers' bias-dropout-add on the CPU: residual + dropout(x + bias), each kept value
    scaled by 1 / (1 - rate), about p of them dropped; torch's dropout is not called. Without
    training, or at rate 0, it is megatron's (x + bias + residual)."""
    calls, real = [], F.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, bias, residual = (torch.randn(*shape, generator=g) for shape in
                         ((128, 8, 64), (64,), (128, 8, 64)))
    out = get_bias_dropout_add(True, False)((x, bias), residual, 0.2)
    kept = (out - residual) != 0
    assert calls == [] and abs(kept.float().mean().item() - 0.8) < 0.01
    torch.testing.assert_close((out - residual)[kept], ((x + bias) / 0.8)[kept],
                               rtol=1e-5, atol=1e-5)
    for training, p in ((False, 0.2), (True, 0.0)):
        # megatron's adds in place when nothing needs a gradient: give it copies
        bda = get_bias_dropout_add(training, False)
        torch.testing.assert_close(bda((x.clone(), bias), residual.clone(), p), x + bias + residual)
    assert dropout(x, 0.2, training=False) is x
    torch.manual_seed(3)
    mean = torch.stack([dropout(x, 0.2) for _ in range(2000)]).mean(0)
    assert (mean - x).abs().mean().item() < 0.02
