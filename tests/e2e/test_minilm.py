"""Real weights: all-MiniLM-L6-v2 imported, checked against transformers on real text, fine-tuned
on Cranfield's train triplets, exported, and scored identically by megarank, transformers and
sentence-transformers' CrossEncoder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from megarank.data.beir import candidates, load_collection, read_trec_run
from tests.helpers.artefacts import score_pairs, train_in_process
from tests.helpers.runs import data_dir, run_cli

pytestmark = pytest.mark.slow
MAX_LENGTH, MAX_QUERY = 128, 32  # the data config's defaults


def _real_pairs(tokenizer, per_query: int = 10, limit: int = 60) -> list[tuple[str, str]]:
    """Cranfield test queries with their BM25 top documents, kept when nothing is truncated (so
    every tool sees the same tokens)."""
    root = data_dir("cranfield")
    coll = load_collection(root)
    qids = coll.split_qids("test")
    cands = candidates(read_trec_run(root / "run.bm25.trec"), qids, per_query)
    pairs = []
    for q in qids:
        for d in cands[q]:
            text_q, text_d = coll.queries[q], coll.corpus[d]
            if (len(tokenizer(text_q)["input_ids"]) <= MAX_QUERY
                    and len(tokenizer(text_q, text_d)["input_ids"]) <= MAX_LENGTH):
                pairs.append((text_q, text_d))
    assert len(pairs) >= 30
    return pairs[:limit]


def _megarank_scores(model_dir, pairs, tmp_path, name) -> torch.Tensor:
    return torch.tensor(score_pairs(model_dir, pairs, tmp_path / name, "--batch-size", "16"))


def _hf_scores(export_dir, pairs) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    with torch.no_grad():
        enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True,
                  return_tensors="pt")
        return model(**enc).logits[:, 0]


def test_minilm_import_finetune_export(minilm, tmp_path):
    pairs = _real_pairs(AutoTokenizer.from_pretrained(minilm["hf"]))

    # 1. Import, export straight away (the session's `megarank convert from-hf` and `to-hf`):
    # megarank and transformers agree on real text (fp32).
    imported, export0 = minilm["imported"], minilm["export"]
    ours = _megarank_scores(imported, pairs, tmp_path, "imported")
    theirs = _hf_scores(export0, pairs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.std() > 1e-3

    # 2. Fine-tune from the HF directory (in this process). At lr 3e-5 it took 200 steps for the
    # last of four logged mean losses to come under the first (1.384, 1.378, 1.368, 1.350); at
    # 2e-4, 60 steps do (1.386, 1.374, 1.367, 1.352).
    cranfield = data_dir("cranfield")
    run = tmp_path / "run"
    train_in_process([
        "model=minilm", "task=listwise", "task.group_size=4", "trainer.max_steps=60",
        "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "optim.lr=2e-4",
        "optim.warmup_steps=10", "trainer.log_interval=15",
        "trainer.eval_at_end=false", "trainer.progress_bar=false",
        f"data.train_path={cranfield}/train_triplets.jsonl", f"trainer.output_dir={run}"])
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]

    # 3. Export; megarank, transformers and sentence-transformers give the same scores.
    export = tmp_path / "export"
    run_cli("megarank.convert", ["to-hf", "--ckpt", run, "--out", export])
    ours = _megarank_scores(run, pairs, tmp_path, "trained")
    theirs = _hf_scores(export, pairs)
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(export), device="cpu")
    st = torch.tensor(ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=16))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(st.float(), theirs, atol=1e-4, rtol=0)
    # The fine-tuned classifier is no longer the imported one.
    assert (ours - _hf_scores(export0, pairs)).abs().max() > 1e-2
