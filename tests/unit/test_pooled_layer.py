"""The last layer computed for the pooled rows only (``trainer.pooled_last_layer``,
megarank.models.pooling): scores, losses and every gradient equal the full layer's, for the
encoder ([CLS], padding mask), the decoder (last token, causal, RoPE, GQA, q/k norms) and the
yes/no head, right-padded and packed, with activation recomputation; and the layer really
computes n rows, not s x b."""

from __future__ import annotations

import pytest
import torch

from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.data.packing import pack_batch
from megarank.training.losses import group_loss
from megarank.training.sizing.activations import pooled_in_plan
from tests.helpers.pairs import UNEVEN_DOCS as DOCS
from tests.helpers.pairs import UNEVEN_QUERIES

QUERIES = UNEVEN_QUERIES[:2]


def _run(cfg, packed: bool):
    """Scores, loss, gradients and the rows the last layer's MLP saw, for one micro-batch."""
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        c = bundle.collator
        batch = c.encode_tokens(c.tokenize_queries(QUERIES), c.tokenize_documents(DOCS),
                                [0, 0, 0, 1, 1, 1], 3)
        if packed:
            batch = pack_batch(batch, 16)
        model = bundle.model
        stage = model.module
        last = (getattr(stage.backbone, "encoder", None) or stage.backbone.decoder).layers[-1]
        seen = []
        hook = last.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
        model.zero_grad_buffer()
        scores = model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                       batch.pool_index, packed=batch.packed)
        loss = group_loss(scores.float().view(-1, 3), "listwise", 1.0, 0.0).mean()
        loss.backward()
        hook.remove()
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()
                 if getattr(p, "main_grad", None) is not None and p.requires_grad}
        # The memory plan's rule (megarank.training.sizing) counts the layer the build made.
        assert pooled_in_plan(cfg, "cpu") == bool(stage._pooled_layer)
        return scores.detach(), loss.detach(), grads, seen


@pytest.mark.parametrize("model, extra", [
    ("bert_tiny", []),
    ("gpt_tiny", []),
    ("gpt_tiny", ["pair.head=yes_no", "model.qk_layernorm=true"]),
], ids=["bert", "gpt", "gpt-yes_no-qknorm"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_pooled_last_layer_equals_the_full_layer(model, extra, packed, recompute):
    """fp32, dropout 0: scores and loss to 1e-6, every gradient to 1e-5; the last layer's MLP
    sees one row per pair with pooling and every token without."""
    base = [f"model={model}", "pair.max_length=32", "pair.max_query_length=8",
            "model.hidden_dropout=0", "model.attention_dropout=0", "task.group_size=3",
            f"trainer.recompute={recompute}", *extra]
    s0, l0, g0, rows0 = _run(compose([*base, "trainer.pooled_last_layer=false"]), packed)
    s1, l1, g1, rows1 = _run(compose(base), packed)
    assert rows1[0] == (1, len(DOCS))  # [1, n]: the pooled rows only
    assert rows0[0][0] * rows0[0][1] > 4 * len(DOCS)  # the full layer: every token
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g0) > 4
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pooled_last_layer_is_refused_by_name_where_the_layer_cannot(monkeypatch, caplog):
    """DeBERTa's disentangled attention computes every row, and the log says why."""
    import logging

    log = logging.getLogger("megarank")  # an earlier run may have given it its own stream
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    caplog.set_level(logging.INFO, logger="megarank")
    cfg = compose(["model=deberta_tiny"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        assert not bundle.model.module._pooled_layer
    assert not pooled_in_plan(cfg, "cpu")  # and the memory plan counts the full layer
    assert "pooled_last_layer" in caplog.text and "DisentangledAttention" in caplog.text

