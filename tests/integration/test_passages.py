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
from megarank.data.truncation import windows

FILLER = "the wing of a plane flies over water"


def _keyword_model(root, classifier: float = 1.0, noise: float = 0.0):
    """The keyword BERT; ``noise``: the weights it leaves at zero drawn from N(0, noise^2)
    instead (seeded), which keeps its LayerNorms' inputs away from zero for training."""
    torch.manual_seed(0)
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
                p.normal_(0.0, noise) if noise else p.zero_()
        model.bert.embeddings.word_embeddings.weight[key, 0] = 1.0
        model.classifier.weight[0, 0] = classifier
    out = root / f"keyword_bert_{classifier}_{noise}"
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
                                     ["pair.max_length=64", "pair.max_query_length=8"])
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


def _long_triplets(path, n: int = 8):
    """Training groups whose evidence lies past the first window: every document is ~100
    tokens of filler (3 windows of 60 with the query); the positive ends in "zebra", each
    negative in another word."""
    words = " ".join([FILLER] * 12)
    ends = ("water", "plane", "river", "cloud", "stone", "paper", "glass")
    with open(path, "w") as f:
        for i in range(n):
            neg = [f"{words} {ends[(i + j) % len(ends)]}" for j in range(3)]
            f.write(json.dumps({"query": "animals", "pos": [f"{words} zebra"], "neg": neg}) + "\n")
    return path


def _train_long(tmp_path, passages: str):
    """The keyword BERT with its classifier at zero (every score 0): training has to learn to
    read the "zebra" direction its encoder puts into [CLS]."""
    out = tmp_path / f"run_{passages}"
    megarank.train_model([
        "model=hf", f"model.hf_path={_keyword_model(tmp_path, 0.1, 0.02)}", "task=listwise",
        "task.group_size=4", "data=beir",
        f"data.train_path={_long_triplets(tmp_path / 'long.jsonl')}", f"data.passages={passages}",
        "pair.max_length=64", "pair.max_query_length=8", "trainer.max_steps=30",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_interval=1",
        "trainer.save_interval=0", "trainer.eval_interval=0", "trainer.eval_at_end=false",
        "trainer.progress_bar=false", "optim.lr=2e-3", "optim.warmup_steps=0",
        f"trainer.output_dir={out}",
    ])
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    return out, losses


def test_maxp_training_learns_what_lies_past_the_first_window(tmp_path):
    """FirstP training sees four identical documents per group (the evidence is cut off): the
    listwise loss stays at log 4 however long it trains. MaxP training scores each document's
    windows (at most data.train_passages of them, from its start: here the evidence lies in the
    last of 3) and trains on the best: the loss falls, and the trained model, evaluated with
    MaxP, ranks the long relevant document of the long collection first."""
    import math

    _, first = _train_long(tmp_path, "first")
    assert len(first) == 30 and all(v == pytest.approx(math.log(4), abs=1e-4) for v in first)
    out, maxp = _train_long(tmp_path, "max")
    assert len(maxp) == 30 and all(math.isfinite(v) for v in maxp)
    assert sum(maxp[-5:]) / 5 < 0.5 * math.log(4), maxp
    coll, run = _collection(tmp_path)
    result = megarank.evaluate_model(out, coll, run=run, split=None, top_k=5,
                                     overrides=["data.passages=max"])
    assert result["megarank"]["RR@10"] == pytest.approx(1.0)


def test_maxp_training_batches_hold_every_window_of_a_document():
    """A training batch under MaxP: a row per window of each document (its first
    train_windows), ``windows`` naming them, and the best window's score is the document's."""
    from megarank.data.truncation import max_over_windows
    from tests.helpers.pairs import pair_collator

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "bert-uncased")
    c = pair_collator(tok, "encoder", max_length=16, max_query_length=4, train_windows=3)
    budget = 16 - 3 - 1  # a one-token query: 12 document tokens a window, a stride of 6
    assert c.truncation.document_tokens == 13 + 2 * 6
    doc = list(range(1000, 1040))
    kept = doc[: c.truncation.document_tokens]
    batch = c.encode_windows([[7]], [kept, doc[:5]], [0, 0], 2, teacher=[0.5, 0.1],
                             max_windows=3)
    assert batch.windows.tolist() == [[0, 1, 2], [3, -1, -1]]
    assert batch.input_ids.shape[0] == 4
    assert batch.teacher_scores.tolist() == pytest.approx([0.5, 0.1])
    for row, start in enumerate((0, 6, 12)):
        assert batch.input_ids[row, 3:3 + budget].tolist() == kept[start:start + budget]
    scores = torch.tensor([0.1, 0.9, 0.3, -2.0], requires_grad=True)
    best = max_over_windows(scores, batch.windows)
    assert best.tolist() == pytest.approx([0.9, -2.0])
    best.sum().backward()
    assert scores.grad.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_served_maxp_scores_are_the_scorers(tmp_path):
    """`megarank serve` with data.passages=max answers each pair with its best window's score,
    the score load_scorer (and so `megarank score` / `evaluate`) gives; FirstP stays FirstP."""
    import asyncio

    from megarank.serving.engine import RerankEngine, ServeLimits

    model = megarank.convert_from_hf(_keyword_model(tmp_path), tmp_path / "ckpt",
                                     ["pair.max_length=64", "pair.max_query_length=8"])
    pairs = [("animals", " ".join([FILLER] * 25) + " zebra"), ("animals", "a zebra"),
             ("animals", FILLER), ("animals", " ".join([FILLER] * 40))]
    for mode in ("first", "max"):
        with megarank.load_scorer(model, [f"data.passages={mode}"]) as scorer:
            want = scorer.score(pairs)
        # Forward passes of at most 128 tokens: one request's windows span several of them.
        engine = RerankEngine.load(model, [f"data.passages={mode}"],
                                   limits=ServeLimits(max_batch_tokens=128))
        try:
            assert engine.info()["passages"] == mode
            engine.start()
            got, _ = asyncio.run(engine.score(pairs))
        finally:
            engine.close()
        assert got == pytest.approx(want, abs=1e-6)
        assert (got[0] > 0.1) == (mode == "max")


def test_a_dataset_prepared_for_firstp_is_refused_for_maxp_training(tmp_path):
    """A prepared dataset holds each document cut to what one window needs; MaxP training needs
    more of it, so the dataset is refused with the config field named, not read short."""
    from megarank.data.prepared import PreparedError, open_prepared, write_prepared
    from tests.helpers.pairs import pair_collator

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "bert-uncased")

    def collator(windows):
        return pair_collator(tok, "encoder", max_length=64, max_query_length=8,
                            train_windows=windows)

    write_prepared([_long_triplets(tmp_path / "long.jsonl")], tmp_path / "prepared", collator(1))
    data = open_prepared(tmp_path / "prepared")
    data.check_settings(collator(1))
    with pytest.raises(PreparedError, match=r"document_tokens .*data\.train_passages"):
        data.check_settings(collator(3))
