"""``megarank mine`` on Cranfield: valid triplets, judged positives, no judged-relevant negative,
skip-top, the margin guard, determinism, and BM25 candidates that are the shipped BM25 run's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megarank.api import ArgumentError, mine_triplets
from megarank.data.beir import candidates, load_collection, read_trec_run
from megarank.data.mining import BM25Index, judged_positives, select_negatives
from megarank.data.triplets import read_triplets
from megarank.mine import main as mine_command
from tests.helpers.runs import data_dir

ROOT = data_dir("cranfield")


@pytest.fixture(scope="module")
def coll():
    return load_collection(ROOT)


@pytest.fixture(scope="module")
def index(coll):
    return BM25Index(coll.corpus, progress=False)


def _mine(tmp_path, name="t.jsonl", **kw):
    out = tmp_path / name
    stats = mine_triplets(ROOT, out, progress=False, **kw)
    return out, stats


def test_triplets_hold_judged_positives_and_no_judged_relevant_negative(tmp_path, coll):
    out, stats = _mine(tmp_path, negatives=7)
    records = read_triplets(out)
    qids = [q for q in coll.split_qids("train") if judged_positives(coll, q)]
    assert stats.written == len(records) == len(qids) > 100
    for qid, rec in zip(qids, records, strict=True):
        relevant = {coll.corpus[d] for d, r in coll.qrels[qid].items() if r >= 1}
        assert rec.query == coll.queries[qid]
        assert set(rec.pos) == relevant
        assert not relevant & set(rec.neg)
        assert len(rec.neg) == 7 and len(set(rec.neg)) == 7
        assert rec.neg_scores is None  # BM25 scores are not teacher scores


def test_skip_top_is_honoured(tmp_path, coll, index):
    out, _ = _mine(tmp_path, skip_top=5, negatives=10, depth=30)
    qids = [q for q in coll.split_qids("train") if judged_positives(coll, q)]
    for qid, rec in zip(qids, read_triplets(out), strict=True):
        ranked, _ = index.top(coll.queries[qid], 30)
        top5 = {coll.corpus[d] for d, _ in ranked[:5]}
        allowed = {coll.corpus[d] for d, _ in ranked[5:]}
        assert not top5 & set(rec.neg)
        assert set(rec.neg) <= allowed


def test_same_seed_same_bytes_other_seed_other_draw(tmp_path):
    a, _ = _mine(tmp_path, "a.jsonl", seed=3)
    b, _ = _mine(tmp_path, "b.jsonl", seed=3)
    c, _ = _mine(tmp_path, "c.jsonl", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_bm25_candidates_match_the_shipped_bm25_run(coll, index):
    # run.bm25.trec is plain BM25 (k1=0.9, b=0.4, no stemming); bm25s set the same way should
    # retrieve mostly the same top 10 (tokenizers differ a little, so not all of it).
    shipped = candidates(read_trec_run(ROOT / "run.bm25.trec"), list(coll.queries), 10)
    overlaps = [len({d for d, _ in index.top(coll.queries[q], 10)[0]} & set(shipped[q])) / 10
                for q in coll.queries]
    assert np.mean(overlaps) >= 0.7


def test_select_negatives_skip_positives_margin_and_draw():
    corpus = {f"d{i}": f"text {i}" for i in range(10)} | {"dup": "text 1"}
    ranked = [(f"d{i}", 10.0 - i) for i in range(10)] + [("dup", 0.5)]
    pos = {"d1": 9.0, "d4": 6.0}
    kw = dict(skip_top=1, negatives=100, margin=None, seed=0)
    # d0 skipped, positives and the copy of a positive's text dropped, rank order kept.
    assert [d for d, _ in select_negatives(ranked, pos, corpus, "q", **kw)] == \
        ["d2", "d3", "d5", "d6", "d7", "d8", "d9"]
    # margin 1.5: only candidates scoring <= 6.0 - 1.5 stay.
    kw["margin"] = 1.5
    assert [d for d, _ in select_negatives(ranked, pos, corpus, "q", **kw)] == \
        ["d6", "d7", "d8", "d9"]
    kw.update(margin=None, negatives=3)
    draw = select_negatives(ranked, pos, corpus, "q", **kw)
    assert len(draw) == 3 and draw == sorted(draw, key=lambda x: -x[1])
    assert draw == select_negatives(ranked, pos, corpus, "q", **kw)


def test_queries_without_positive_are_skipped_and_counted(tmp_path):
    root = tmp_path / "coll"
    root.mkdir()
    docs = ["wing lift at low speed", "boundary layer heat transfer", "shock wave in a nozzle"]
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": str(i), "title": "", "text": t}) + "\n" for i, t in enumerate(docs)))
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "a", "text": "wing lift"}) + "\n"
        + json.dumps({"_id": "b", "text": "heat transfer"}) + "\n")
    # No split.json: every judged query is mined; "b" is judged, but nothing is relevant.
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\na\t0\t2\nb\t1\t0\n")
    out = tmp_path / "t.jsonl"
    stats = mine_triplets(root, out, negatives=2, progress=False)
    assert stats.written == 1 and stats.skipped_no_positive == ["b"]
    rec = read_triplets(out)[0]
    assert rec.pos == (docs[0],) and docs[0] not in rec.neg


def test_dense_retriever_needs_a_model(tmp_path):
    # The library names its parameters; the command says its flags.
    with pytest.raises(ArgumentError, match=r"^retriever dense needs model \(a reranker"):
        mine_triplets(ROOT, tmp_path / "x.jsonl", retriever="dense", progress=False)
    with pytest.raises(SystemExit, match=r"megarank mine: --retriever dense needs --model "):
        mine_command(["--collection", str(ROOT), "--out", str(tmp_path / "x.jsonl"), "--retriever", "dense"])
    assert not (tmp_path / "x.jsonl").exists()


def test_a_pseudo_query_needs_a_positive_and_a_negative_besides_its_source(tmp_path):
    from megarank.data.mining import mine

    root = tmp_path / "coll"
    root.mkdir()
    docs = {"0": ("Privacy and the library", "who reads what"),
            "1": ("Shock waves in nozzles", "nozzle flow"),
            "2": ("Flow in a nozzle", "shock waves at the throat"),
            "3": ("Nozzle shock structure", "waves in nozzle flow")}
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in docs.items()))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "a", "text": "nozzle"}) + "\n")
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\na\t1\t1\n")
    out = tmp_path / "t.jsonl"
    # a stand-in teacher: longer documents score higher
    stats = mine(root, out, rescore=lambda c, keys: [float(len(c.corpus[d])) for _, d in keys],
                 negatives=2, pseudo=4, progress=False)
    # "Privacy and the library" shares words with no other document: no candidate, no triplet
    assert stats.skipped_pseudo == ["pseudo:0"]
    assert stats.written == 1 + 3 and stats.pseudo_written == 3
    rows = read_triplets(out)
    assert [r.query for r in rows[1:]] == ["Shock waves in nozzles", "Flow in a nozzle",
                                           "Nozzle shock structure"]
    assert all(len(r.pos) == 1 and r.neg for r in rows[1:])


