"""Long documents: FirstP scores a document's first window, MaxP the best of its windows.

The collection is built so that the one relevant document's evidence lies past the first
window. The model is a real BERT cross-encoder whose weights are set by hand so that its score
is positive exactly when the pair holds the token "zebra" (uniform attention gathers it into
[CLS]; the classifier reads that direction) and zero otherwise: FirstP cannot see the evidence
and ranks the relevant document among four ties; MaxP finds it.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import megarank
from megarank.config.schema import ASSETS
from megarank.eval.scorer import windows

FILLER = "the wing of a plane flies over water"


def _keyword_model(root):
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "bert-uncased")
    key = tok.convert_tokens_to_ids("zebra")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=128,
                     type_vocab_size=2, num_labels=1, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = BertForSequenceClassification(cfg)
    eye = torch.eye(cfg.hidden_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.fill_(1.0)
            elif any(k in name for k in ("attention.self.value.weight",
                                         "attention.output.dense.weight", "pooler.dense.weight")):
                p.copy_(eye)
            else:
                p.zero_()
        model.bert.embeddings.word_embeddings.weight[key, 0] = 1.0
        model.classifier.weight[0, 0] = 1.0
    out = root / "keyword_bert"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _collection(root):
    """One query; five documents of ~200 words; only d0 (relevant) holds "zebra", at its end."""
    coll = root / "long"
    coll.mkdir()
    words = " ".join([FILLER] * 25)
    docs = {f"d{i}": words + (" zebra" if i == 0 else " water") for i in range(5)}
    (coll / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items()))
    (coll / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "animals"}) + "\n")
    (coll / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\n")
    run = coll / "run.trec"
    run.write_text("".join(f"q1 Q0 d{i} {i + 1} {10 - i} bm25\n" for i in (3, 1, 0, 4, 2)))
    return coll, run


def test_windows_cover_the_document():
    ids = list(range(10))
    assert windows(ids, 4, 2) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert windows(ids, 4, 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows(ids, 20, 5) == [ids] and windows([], 4, 2) == [[]]


def test_maxp_finds_what_lies_past_the_first_window(tmp_path):
    model = megarank.convert_from_hf(_keyword_model(tmp_path), tmp_path / "ckpt",
                                     ["data.max_length=64", "data.max_query_length=8"])
    coll, run = _collection(tmp_path)
    pairs = [("animals", " ".join([FILLER] * 25) + " zebra"), ("animals", "a zebra"),
             ("animals", FILLER)]
    scores = {}
    for mode in ("first", "max"):
        with megarank.load_scorer(model, [f"data.passages={mode}"]) as scorer:
            scores[mode] = scorer.score(pairs)
    # Short documents score the same either way; the long one only under MaxP.
    assert scores["first"][1] == pytest.approx(scores["max"][1], abs=1e-6) and scores["max"][1] > 0.1
    assert scores["first"][2] == scores["max"][2] == pytest.approx(0.0, abs=1e-6)
    assert scores["first"][0] == pytest.approx(0.0, abs=1e-6) and scores["max"][0] > 0.1

    result = {}
    for mode in ("first", "max"):
        result[mode] = megarank.evaluate_model(
            model, coll, run=run, split=None, top_k=5, overrides=[f"data.passages={mode}"])
    # FirstP: five tied scores, ranked pessimistically (the relevant one last); MaxP: first.
    assert result["first"]["megarank"]["RR@10"] == pytest.approx(0.2)
    assert result["max"]["megarank"]["RR@10"] == pytest.approx(1.0)
