"""BEIR loader on the shipped collections, BM25 reference numbers, and file:line errors."""

import json
from pathlib import Path

import ir_measures
import pytest
from ir_measures import nDCG

from megarank.data.beir import (
    Collection,
    candidates,
    check_run_against,
    document_text,
    load_collection,
    read_trec_run,
    write_trec_run,
)
from megarank.eval.metrics import mean_metrics

COLLECTIONS = Path(__file__).resolve().parents[2] / "megarank" / "assets" / "collections"

# (docs, queries, judged queries, judgements, train, test, BM25 test NDCG@10) from SOURCE.md.
EXPECTED = {
    "cranfield": (1400, 225, 225, 1837, 112, 113, 0.342),
    "cisi": (1460, 112, 76, 3114, 38, 38, 0.290),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def collection(request: pytest.FixtureRequest) -> Collection:
    return load_collection(COLLECTIONS / request.param)


def test_counts(collection: Collection) -> None:
    docs, queries, judged, judgements, train, test, _ = EXPECTED[collection.root.name]
    assert len(collection.corpus) == docs
    assert len(collection.queries) == queries
    assert len(collection.qrels) == judged
    assert sum(len(j) for j in collection.qrels.values()) == judgements
    assert collection.split is not None
    assert len(collection.split_qids("train")) == train
    assert len(collection.split_qids("test")) == test


def test_qrels_match_trec_copy(collection: Collection) -> None:
    trec = {}
    for qrel in ir_measures.read_trec_qrels(str(collection.root / "qrels.trec")):
        trec.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
    assert collection.qrels == trec


def test_bm25_test_ndcg_matches_readme_and_ir_measures(collection: Collection) -> None:
    run_path = collection.root / "run.bm25.trec"
    run = read_trec_run(run_path)
    check_run_against(collection, run, run_path)
    test_run = {qid: run[qid] for qid in collection.split_qids("test")}
    test_qrels = collection.split_qrels("test")
    ours = mean_metrics(test_run, test_qrels, ["NDCG@10"])["NDCG@10"]
    assert ours == pytest.approx(EXPECTED[collection.root.name][-1], abs=1e-3)
    # ir-measures reads the files itself, so this also checks both readers.
    qrels = ir_measures.read_trec_qrels(str(collection.root / "qrels.trec"))
    scored = ir_measures.read_trec_run(str(run_path))
    theirs = ir_measures.calc_aggregate(
        [nDCG @ 10],
        [q for q in qrels if q.query_id in test_qrels],
        [s for s in scored if s.query_id in test_qrels],
    )[nDCG @ 10]
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_document_text() -> None:
    assert document_text("Title", "Body.") == "Title. Body."
    assert document_text("A question?", "Body.") == "A question? Body."
    # Cranfield texts repeat their title: keep it once.
    assert document_text("wing flow .", "wing flow . the study") == "wing flow . the study"
    assert document_text("", " body ") == "body"
    assert document_text("Only title", "") == "Only title"


def test_run_roundtrip_and_candidates(tmp_path: Path) -> None:
    run = {"q2": {"b": 0.5, "a": 0.5, "c": 2.25}, "q1": {"x": 1 / 3}}
    path = tmp_path / "out.trec"
    write_trec_run(run, path, tag="rerank")
    lines = path.read_text().splitlines()
    # Ties go by docid, queries keep run order, scores survive exactly.
    assert lines[:3] == ["q2 Q0 c 1 2.25 rerank", "q2 Q0 a 2 0.5 rerank", "q2 Q0 b 3 0.5 rerank"]
    assert read_trec_run(path) == run
    assert candidates(run, ["q2", "q1", "absent"], top_k=2) == {
        "q2": ["c", "a"],
        "q1": ["x"],
        "absent": [],
    }
    with pytest.raises(ValueError, match="tag"):
        write_trec_run(run, path, tag="two words")


def write_collection(root: Path, **overrides: str | None) -> Path:
    """A two-document collection; ``overrides`` replace whole files by name (dots as ``_``)."""
    files = {
        "corpus_jsonl": '{"_id": "d1", "title": "T", "text": "one"}\n'
        '{"_id": "d2", "title": "", "text": "two"}\n',
        "queries_jsonl": '{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n',
        "qrels_tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n",
    }
    files.update(overrides)
    root.mkdir(exist_ok=True)
    for name, text in files.items():
        if text is not None:
            (root / name.replace("_", ".")).write_text(text)
    return root


def test_small_collection_without_split(tmp_path: Path) -> None:
    collection = load_collection(write_collection(tmp_path))
    assert collection.corpus == {"d1": "T. one", "d2": "two"}
    assert collection.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert collection.split is None
    with pytest.raises(ValueError, match="no split.json"):
        collection.split_qids("test")


@pytest.mark.parametrize(
    ("file", "text", "lineno", "message"),
    [
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n',
            2,
            "malformed JSON",
        ),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"title": "t", "text": "b"}\n', 2, "'_id'"),
        ("corpus.jsonl", '{"_id": "d1", "title": "t"}\n', 1, "missing 'text'"),
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "a"}\n\n{"_id": "d1", "text": "b"}\n',
            3,
            "duplicate",
        ),
        ("queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q2"}\n', 2, "missing 'text'"),
        (
            "queries.jsonl",
            '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n',
            2,
            "duplicate",
        ),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n", 3, "non-integer"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", 2, "3 tab-separated fields"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", 3, "duplicate"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td7\t1\n", 2, "unknown document id 'd7'"),
        ("split.json", '{"test": ["q1", "q9"]}', 1, "unknown query id 'q9'"),
        ("split.json", '{"test": ["q1",\n ]}', 2, "malformed JSON"),
    ],
)
def test_collection_errors_name_file_and_line(
    tmp_path: Path, file: str, text: str, lineno: int, message: str
) -> None:
    root = write_collection(tmp_path, **{file.replace(".", "_"): text})
    with pytest.raises(ValueError, match=message) as info:
        load_collection(root)
    assert str(info.value).startswith(f"{root / file}:{lineno}: ")


def test_missing_files(tmp_path: Path) -> None:
    root = write_collection(tmp_path, qrels_tsv=None)
    with pytest.raises(FileNotFoundError, match="qrels.tsv"):
        load_collection(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_collection(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="run.trec"):
        read_trec_run(tmp_path / "run.trec")


@pytest.mark.parametrize(
    ("text", "lineno", "message"),
    [
        ("q1 Q0 d1 1 3.5 bm25\nq1 Q0 d2 2 3.0\n", 2, "expected 6 fields"),
        ("q1 Q0 d1 1 3.5 bm25\n\nq1 Q0 d2 2 high bm25\n", 3, "non-numeric score"),
        ("q1 Q0 d1 1 nan bm25\n", 1, "non-finite score"),
        ("q1 Q0 d1 1 3.5 bm25\nq1 Q0 d1 2 3.0 bm25\n", 2, "duplicate document id 'd1'"),
    ],
)
def test_run_errors_name_file_and_line(
    tmp_path: Path, text: str, lineno: int, message: str
) -> None:
    path = tmp_path / "run.trec"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_trec_run(path)
    assert str(info.value).startswith(f"{path}:{lineno}: ")


def test_check_run_against(tmp_path: Path) -> None:
    collection = load_collection(write_collection(tmp_path))
    check_run_against(collection, {"q1": {"d1": 1.0, "d2": 0.0}}, "ok.trec")
    with pytest.raises(ValueError, match=r"^bad\.trec: .*unknown document id 'd9'"):
        check_run_against(collection, {"q1": {"d1": 1.0, "d9": 0.5, "d8": 0.1}}, "bad.trec")
    with pytest.raises(ValueError, match=r"^bad\.trec: unknown query id 'q9'"):
        check_run_against(collection, {"q9": {"d1": 1.0}}, "bad.trec")


def test_split_json_shape(tmp_path: Path) -> None:
    root = write_collection(tmp_path, split_json=json.dumps({"train": ["q1"], "test": ["q2"]}))
    collection = load_collection(root)
    assert collection.split_qrels("test") == {"q2": {"d2": 2}}
    with pytest.raises(ValueError, match="no split 'dev'"):
        collection.split_qids("dev")
