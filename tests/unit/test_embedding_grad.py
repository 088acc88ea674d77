"""The word embedding's gradient added straight into megatron's buffer on the CPU
(megarank.models.embedding_grad): the gradients equal torch's embedding backward followed by
megatron's DDP hook, over two micro-batches of one step, and the direct path is really taken;
a table tied to the yes/no head's output layer keeps megatron's path."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.models import embedding_grad


def _step_grads(bundle, batches) -> dict[str, torch.Tensor]:
    model = bundle.model
    model.zero_grad_buffer()
    for ids in batches:
        mask = torch.ones_like(ids)
        pool = torch.full((ids.shape[0],), ids.shape[1] - 1)
        model(ids, mask, torch.zeros_like(ids), pool).float().sum().backward()
    return {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model", ["bert_tiny", "gpt_tiny"])
def test_rows_into_main_grad_equal_torchs_backward_and_the_hook(model):
    cfg = compose([f"model={model}", "pair.max_length=32", "pair.max_query_length=8",
                   "model.hidden_dropout=0", "model.attention_dropout=0"])
    g = torch.Generator().manual_seed(0)
    # Two micro-batches, tokens repeated within and across them.
    batches = [torch.randint(5, 60, (4, 32), generator=g) for _ in range(2)]
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        (emb,) = [m for m in bundle.model.modules() if isinstance(m, VocabParallelEmbedding)]
        direct = _step_grads(bundle, batches)
        assert emb.weight.grad_added_to_main_grad  # the direct path ran
        embedding_grad.remove(emb)  # megatron's own lookup
        reference = _step_grads(bundle, batches)
        assert not emb.weight.grad_added_to_main_grad
        embedding_grad.rows_into_main_grad(emb)  # back, and a second install wraps nothing
        forward = emb.forward
        embedding_grad.rows_into_main_grad(emb)
        assert embedding_grad.installed(emb) and emb.forward is forward
    word = next(n for n in direct if "word_embeddings" in n)
    assert float(reference[word].abs().sum()) > 0
    for name in reference:
        torch.testing.assert_close(direct[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_a_table_tied_to_the_output_layer_keeps_megatrons_path():
    """yes/no head with tied embeddings: the output layer's gradient of the same weight would be
    dropped by the hook if the lookup had said its rows were already added."""
    cfg = compose(["model=gpt_tiny", "pair.head=yes_no", "model.tie_word_embeddings=true",
                   "pair.max_length=32", "pair.max_query_length=8", "model.hidden_dropout=0",
                   "model.attention_dropout=0"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        (emb,) = [m for m in bundle.model.modules() if isinstance(m, VocabParallelEmbedding)]
        assert not embedding_grad.installed(emb)
        _step_grads(bundle, [torch.randint(5, 60, (2, 32))])
        assert not emb.weight.grad_added_to_main_grad
