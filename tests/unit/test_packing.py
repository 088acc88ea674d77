"""Padding-free micro-batches (data.packing): pairs end to end in one row, attention inside each
pair. The packed forward must compute what the padded one does: scores, losses and gradients,
for the encoder (BERT: bidirectional, learned positions, token types, [CLS] pooling) and the
decoder (Llama-style: causal, RoPE, grouped-query attention, last-token pooling), with MaxP
windows, and the yes/no head."""

from __future__ import annotations

import itertools

import pytest
import torch

from megarank.bundle import build_bundle
from megarank.config import compose
from megarank.data.packing import pack_batch, pack_lengths
from megarank.data.truncation import max_over_windows
from megarank.training.losses import group_loss
from tests.helpers.pairs import UNEVEN_DOCS, UNEVEN_QUERIES

QUERIES, DOCS = UNEVEN_QUERIES, UNEVEN_DOCS


def test_layout_of_a_packed_row():
    """Segments, positions and the gather/scatter maps of three pairs in a row of 12."""
    p = pack_lengths(torch.tensor([3, 2, 4]), 12)
    assert p.cu_seqlens.tolist() == [0, 3, 5, 9, 12]  # the last segment is padding
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert p.max_seqlen == 4
    assert p.gather_index.tolist() == [[0, 1, 2, 12], [3, 4, 12, 12], [5, 6, 7, 8],
                                       [9, 10, 11, 12]]
    flat = p.gather_index.flatten()
    # scatter_index inverts gather_index on every row position
    assert flat[p.scatter_index].tolist() == list(range(12))
    with pytest.raises(ValueError, match="cannot hold"):
        pack_lengths(torch.tensor([3, 2, 4]), 8)


def _scores_and_grads(bundle, batch):
    model = bundle.model  # megatron DDP: gradients accumulate in each parameter's main_grad
    model.zero_grad_buffer()
    scores = model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                   batch.pool_index, packed=batch.packed)
    docs = scores if batch.windows is None else max_over_windows(scores, batch.windows)
    loss = group_loss(docs.float().view(-1, batch.group_size), "listwise", 1.0, 0.0).mean()
    loss.backward()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()
             if getattr(p, "main_grad", None) is not None and p.requires_grad}
    return scores.detach(), loss.detach(), grads


@pytest.mark.parametrize("model, extra", [
    ("bert_tiny", []),
    ("gpt_tiny", []),
    ("gpt_tiny", ["pair.head=yes_no"]),
])
@pytest.mark.parametrize("maxp", [False, True], ids=["firstp", "maxp"])
def test_packed_equals_padded(model, extra, maxp):
    """fp32 on the CPU: packed scores, loss and every gradient equal the padded batch's to 1e-5
    (the CPU path: gathered into [pairs, longest] for one SDPA call, gathered back)."""
    cfg = compose([f"model={model}", "pair.max_length=32", "pair.max_query_length=8",
                   "model.hidden_dropout=0", "model.attention_dropout=0", "task.group_size=3",
                   "data.packing=true", *extra])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        c = bundle.collator
        q = c.tokenize_queries(QUERIES[:2])
        if maxp:
            d = c.truncation.full_documents(DOCS)
            padded = c.encode_windows(q, d, [0, 0, 0, 1, 1, 1], 3, max_windows=3)
            assert padded.num_rows > len(DOCS)  # some documents are read as several windows
        else:
            d = c.tokenize_documents(DOCS)
            padded = c.encode_tokens(q, d, [0, 0, 0, 1, 1, 1], 3)
        lengths = padded.attention_mask.sum(1)
        assert lengths.min() < lengths.max()  # uneven pairs: the padded batch holds padding
        packed = pack_batch(padded, cfg.data.packed_multiple)
        assert packed.input_ids.shape[0] == 1
        assert packed.input_ids.shape[1] % cfg.data.packed_multiple == 0
        assert packed.input_ids.numel() < padded.input_ids.numel()
        s0, l0, g0 = _scores_and_grads(bundle, padded)
        s1, l1, g1 = _scores_and_grads(bundle, packed)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    assert g1.keys() == g0.keys() and len(g0) > 4
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pairs_do_not_see_each_other():
    """Without the segment boundaries a packed pair would attend to its neighbours: changing
    pair 0's tokens must leave pair 1's score unchanged (and change pair 0's)."""
    cfg = compose(["model=bert_tiny", "pair.max_length=32", "pair.max_query_length=8",
                   "model.hidden_dropout=0",
                   "model.attention_dropout=0", "task.group_size=2"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle, torch.no_grad():
        c = bundle.collator
        q = c.tokenize_queries(["lift"])
        a = pack_batch(c.encode_tokens(q, c.tokenize_documents(DOCS[:2]), [0, 0], 2), 8)
        b = pack_batch(c.encode_tokens(q, c.tokenize_documents(["drag", DOCS[1]]), [0, 0], 2),
                       8)
        sa = bundle.model(a.input_ids, a.attention_mask, a.token_type_ids, a.pool_index,
                         packed=a.packed)
        sb = bundle.model(b.input_ids, b.attention_mask, b.token_type_ids, b.pool_index,
                         packed=b.packed)
    assert abs(float(sa[0] - sb[0])) > 1e-4
    assert float(sa[1]) == pytest.approx(float(sb[1]), abs=1e-6)


def _train(tmp_path, name, extra):
    import json

    import megarank

    out = tmp_path / name
    megarank.train_model([
        "model=gpt_tiny", "task=listwise", "task.group_size=4", "data=cranfield",
        "pair.max_length=256", "pair.max_query_length=16", "model.hidden_dropout=0",
        "model.attention_dropout=0", "trainer.max_steps=4", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.save_final=false",
        "trainer.eval_at_end=false", "trainer.progress_bar=false", "optim.warmup_steps=0",
        f"trainer.output_dir={out}", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_packed_training_equals_padded_and_drops_the_padding(tmp_path):
    """Four steps of a real run (Cranfield's groups, uneven lengths), padded and packed: the same
    losses and gradient norms to 1e-5, and what the run counts as computed tokens shows the
    padding gone (were packing silently off, the padded-token count would not move)."""
    padded = _train(tmp_path, "padded", [])
    packed = _train(tmp_path, "packed", ["data.packing=true", "data.packed_multiple=8"])
    assert len(padded) == len(packed) == 4
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6)
    assert min(r["padding_fraction"] for r in padded) > 0.10
    # Packed rows are rounded up to 8 tokens only: under 1% of the ~1,500 tokens a micro-batch.
    assert max(r["padding_fraction"] for r in packed) < 0.01
    assert all(b["pairs_per_s"] > 0 for b in packed)


@pytest.mark.parametrize("passages", ["first", "max"])
def test_scoring_packs_and_scores_as_padded(passages):
    """Evaluation and `megarank score` (PairScorer) and serving read batches through the
    collator's model_layout: with data.packing the model sees one packed row per batch, and
    every score equals the padded one's."""
    from megarank.eval.scorer import PairScorer

    cfg = compose(["model=gpt_tiny", "pair.max_length=32", "pair.max_query_length=8",
                   "model.hidden_dropout=0", "model.attention_dropout=0", "data.packing=true",
                   f"data.passages={passages}"])
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        seen = []
        hook = bundle.model.module.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append((args[0].shape, kwargs.get("packed"))),
            with_kwargs=True)
        scorer = PairScorer(bundle.collator, 8, passages)
        packed = scorer.score(bundle.model, bundle.runtime, pairs)
        assert seen and all(shape[0] == 1 and p is not None for shape, p in seen)
        bundle.collator.packed_multiple = None
        padded = scorer.score(bundle.model, bundle.runtime, pairs)
        hook.remove()
    assert packed.shape == (len(pairs),)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model,passages", [("gpt_tiny", "first"), ("bert_tiny", "max")])
def test_scoring_batches_pairs_by_length_and_keeps_their_order(model, passages):
    """PairScorer batches pairs by length (longest first), so short pairs are not padded to long
    ones: fewer tokens computed than batches in the pairs' order, and every score, in the
    pairs' order, equal to the pair's score alone (last-token and [CLS] pooling, MaxP)."""
    from megarank.eval.scorer import PairScorer

    cfg = compose([f"model={model}", "pair.max_length=32", "pair.max_query_length=8",
                   "model.hidden_dropout=0", "model.attention_dropout=0",
                   f"data.passages={passages}"])
    pairs = [(q, d) for q in QUERIES for d in DOCS]
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        computed = []
        hook = bundle.model.module.register_forward_pre_hook(
            lambda _m, args, kwargs: computed.append(args[0].numel()), with_kwargs=True)
        batched = PairScorer(bundle.collator, 4, passages).score(bundle.model, bundle.runtime, pairs)
        hook.remove()
        alone = PairScorer(bundle.collator, 1, passages).score(bundle.model, bundle.runtime, pairs)
        c = bundle.collator
        if passages == "max":  # a row per window, as the scorer cuts them
            query_ids = c.tokenize_queries(QUERIES)
            row_query, row_ids, _ = c.truncation.window_rows(
                query_ids, c.truncation.full_documents([d for _, d in pairs]),
                [i // len(DOCS) for i in range(len(pairs))])
            encoded = c.encode_tokens(query_ids, row_ids, row_query, 1)
        else:
            encoded = c.encode_pairs(pairs)
        rows = encoded.attention_mask.sum(dim=1).tolist()
    in_order = sum(len(rows[i:i + 4]) * -(-max(rows[i:i + 4]) // 8) * 8
                   for i in range(0, len(rows), 4))
    assert sum(computed) < 0.85 * in_order, (sum(computed), in_order)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_length_passes_sort_longest_first_within_the_token_and_row_budgets():
    from megarank.data.budget import length_passes

    lengths = [5, 40, 7, 40, 12, 3, 33]
    passes = length_passes(lengths, max_tokens=96, pad_multiple=8)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert [lengths[i] for p in passes for i in p] == sorted(lengths, reverse=True)
    for p in passes:
        width = -(-max(lengths[i] for i in p) // 8) * 8
        assert len(p) * width <= 96 or len(p) == 1
    assert length_passes([500], max_tokens=96) == [[0]]  # never an empty pass
    assert [len(p) for p in length_passes(lengths, max_rows=3)] == [3, 3, 1]


def _reference_varlen(gqa: bool):
    """torch's ``varlen_attn`` as its CUDA kernel computes it, on the CPU (per segment SDPA), with
    the signature of torch 2.11 (causal as ``window_size``, no ``enable_gqa``) or, with ``gqa``,
    2.13's; it checks what the flash kernel requires of its arguments."""
    import torch.nn.functional as F

    def run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
        assert isinstance(max_q, int) and isinstance(max_k, int)
        assert window_size in ((-1, -1), (-1, 0)) and return_aux is None
        assert key.shape[1] == query.shape[1] or enable_gqa  # 2.11: heads repeated by the caller
        cu = cu_seq_q.tolist()
        assert cu == cu_seq_k.tolist() and cu[-1] == query.shape[0]
        spans = list(itertools.pairwise(cu))
        assert max(b - a for a, b in spans) <= max_q
        out = []
        for a, b in spans:
            q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))  # [h, L, d]
            out.append(F.scaled_dot_product_attention(
                q, k, v, is_causal=window_size == (-1, 0), scale=scale,
                enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(out)

    if gqa:
        return run

    def run_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                scale=None, window_size=(-1, -1)):
        return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                   scale=scale, window_size=window_size)

    return run_211


@pytest.mark.parametrize("model", ["bert_tiny", "gpt_tiny"])
@pytest.mark.parametrize("torch_version", ["2.11", "2.13"])
def test_varlen_attention_call_equals_padded(monkeypatch, model, torch_version):
    """The CUDA path of packed attention (torch's flash varlen_attn over the segment boundaries)
    run on the CPU against a reference of the kernel with each torch's signature: packed scores
    and gradients equal the padded batch's (fp32, 1e-5), with causality as a window and the
    grouped-query heads (gpt_tiny: 4 heads, 2 groups) repeated where the kernel cannot share
    them; every layer (the pooled last layer off) goes through it."""
    import inspect

    import megarank.models.attention as attention

    calls = []
    fn = _reference_varlen(gqa=torch_version == "2.13")

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return fn(*args, **kwargs)

    monkeypatch.setattr(attention, "_VARLEN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "_VARLEN_DTYPES", (torch.float32,))
    monkeypatch.setattr(attention, "varlen_attention",
                        lambda: (counted, frozenset(inspect.signature(fn).parameters)))
    cfg = compose([f"model={model}", "pair.max_length=32", "pair.max_query_length=8",
                   "model.hidden_dropout=0", "model.attention_dropout=0", "task.group_size=3",
                   "trainer.pooled_last_layer=false"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        c = bundle.collator
        padded = c.encode_tokens(c.tokenize_queries(QUERIES[:2]), c.tokenize_documents(DOCS),
                                 [0, 0, 0, 1, 1, 1], 3)
        s0, l0, g0 = _scores_and_grads(bundle, padded)
        assert not calls
        s1, l1, g1 = _scores_and_grads(bundle, pack_batch(padded, 16))
    assert len(calls) == cfg.model.num_layers
    causal = model == "gpt_tiny"
    assert all(k["window_size"] == ((-1, 0) if causal else (-1, -1)) for k in calls)
    assert all(k.get("enable_gqa", False) == (causal and torch_version == "2.13") for k in calls)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)
