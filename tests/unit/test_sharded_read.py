"""Sharded import reads shards: for every tensor-parallel parameter, what a rank reads through
safetensors' get_slice is exactly its slice of the fused full tensor (QKV per query group, the
gate and up halves, its vocabulary rows, row-parallel columns), and about 1/tp of the bytes.
In process: the parameters of a tp1 model carry megatron's partition attributes; the ranks of
tp2 and tp4 are simulated by index. The TP scores themselves are in tests/parity."""

from __future__ import annotations

import pytest
import torch

from megarank.bundle import build_bundle
from megarank.checkpoint.hf import (
    HFWeights,
    global_name,
    hf_names,
    match,
    read_part,
    to_megarank,
    tp_slice,
)
from megarank.checkpoint.hf_mappings import rules_for
from megarank.config import compose, padded_vocab_size
from tests.helpers.hf_tiny import save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: save_tiny(k, root, causal_lm=k == "qwen3")
            for k in ("qwen2", "qwen3", "xlm_roberta")}


# tp must divide the query groups: 2 KV heads for the decoders, 4 heads for the encoder.
@pytest.mark.parametrize("kind, tp", [("qwen2", 2), ("qwen3", 2), ("xlm_roberta", 2),
                                      ("xlm_roberta", 4)])
def test_rank_reads_equal_slices_of_the_full_tensors(models, kind, tp):
    head = "yes_no" if kind == "qwen3" else "classifier"
    cfg = compose(["model=hf", f"model.hf_path={models[kind]}", f"pair.head={head}"])
    with build_bundle(cfg, device="cpu", load_hf=False) as bundle:
        m = bundle.cfg.model
        vocab = padded_vocab_size(m)
        full_bytes, rank_bytes, sliced = 0, [0] * tp, 0
        for local, param in bundle.model.module.named_parameters():
            rule, layer = match(global_name(local, 0), rules_for(m))
            names = hf_names(rule, layer)
            reference = HFWeights(models[kind])
            if not all(n in reference for n in names):
                continue  # a head the HF files lack (fresh init)
            full = to_megarank(rule, [reference.get(n) for n in names], m, vocab)
            full_bytes += reference.bytes_read
            sliced += bool(getattr(param, "tensor_model_parallel", False))
            for r in range(tp):
                weights = HFWeights(models[kind])
                part = read_part(weights, rule, names, param, r, tp, m, vocab)
                assert torch.equal(part, tp_slice(full, param, rule, r, tp)), (local, r)
                rank_bytes[r] += weights.bytes_read
        assert sliced >= 5
        # Each rank reads its 1/tp of the sharded tensors plus the replicated ones (norms,
        # embeddings of positions, heads): well under the whole model.
        for b in rank_bytes:
            assert b < full_bytes * (1 / tp + 0.15), (b, full_bytes)
        assert sum(rank_bytes) >= full_bytes
