"""``megarank evaluate`` end to end on Cranfield's test split: a short bert_tiny run's checkpoint and
its HF export rerank alike, in one process and over two data-parallel ranks; the first-stage row is
BM25's known number; bad inputs stop before any model is built; empty candidate lists count as 0."""

from __future__ import annotations

import json
import shutil

import ir_measures
import pytest
import torch

from megarank.data.beir import read_trec_run
from megarank.data.triplets import read_triplets
from megarank.eval.report import compute_metrics
from megarank.eval.rerank import read_rerank_task
from tests.helpers.runs import data_dir, run_cli, run_module

ROOT = data_dir("cranfield")
BM25_TEST_NDCG10 = 0.342  # SOURCE.md


@pytest.fixture(scope="module")
def models(tiny_run, tiny_export):
    """(checkpoint run dir, HF export) of the session's short bert_tiny run."""
    return tiny_run, tiny_export


def _evaluate(model, out, *extra, nproc=1, check=True):
    """``megarank evaluate``: in this process, or under torchrun for ``nproc`` ranks."""
    args = ["--model", model, "--collection", ROOT, "--top-k", "20", "--out", out, *extra]
    if nproc == 1:
        return run_cli("megarank.evaluate", args, check=check)
    return run_module("megarank.evaluate", args, nproc, check=check)


@pytest.fixture(scope="module")
def ckpt_eval(models, tmp_path_factory):
    """The checkpoint's single-process evaluation: (out dir, stdout)."""
    out = tmp_path_factory.mktemp("eval") / "ckpt"
    return out, _evaluate(models[0], out).stdout


def _scores(out):
    return read_trec_run(out / "run.megarank.trec")


def _max_gap(a, b):
    assert a.keys() == b.keys() and all(a[q].keys() == b[q].keys() for q in a)
    return max(abs(a[q][d] - b[q][d]) for q in a for d in a[q])


def test_outputs_are_written_and_agree(ckpt_eval):
    out, stdout = ckpt_eval
    m = json.loads((out / "metrics.json").read_text())
    run = _scores(out)
    assert m["queries"] == {"evaluated": 113, "skipped_unjudged": 0, "empty_candidates": 0}
    assert len(run) == 113 and all(len(docs) == 20 for docs in run.values())
    assert set(m["megarank"]) == {"nDCG@10", "RR@10", "R@100", "R@20", "AP"}
    # The first-stage top 20 holds the top 10, so its nDCG@10 is BM25's.
    assert m["first_stage"]["nDCG@10"] == pytest.approx(BM25_TEST_NDCG10, abs=1e-3)
    assert m["cross_check_max_abs_diff"] < 1e-9
    # The metrics are those of the written file, ranked as the file ranks (ties by docid).
    task = read_rerank_task(ROOT, top_k=20)
    assert compute_metrics(run, task.qrels, 20)[0] == m["megarank"]
    assert "first stage (run.bm25.trec)" in stdout and "megarank" in stdout
    assert "NDCG@10" in stdout and "MRR@10" in stdout and "R@20" in stdout


def test_checkpoint_and_hf_export_rerank_alike(models, ckpt_eval, tmp_path):
    out = tmp_path / "hf"
    _evaluate(models[1], out)
    assert _max_gap(_scores(ckpt_eval[0]), _scores(out)) <= 1e-4
    a = json.loads((ckpt_eval[0] / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["megarank"] == b["megarank"] and a["first_stage"] == b["first_stage"]


@pytest.mark.distributed
def test_two_data_parallel_ranks_score_like_one_process(models, ckpt_eval, tmp_path):
    """Two evaluations in one launch of two ranks (the model built once): the test split's
    scores are the single-process evaluation's, and the train split's, given second with its own
    --split and --out, are what a single-process evaluation of that split alone gives."""
    # The HF export, so that the layout comes from the `parallel=` group override.
    out, train = tmp_path / "dp2", tmp_path / "dp2_train"
    proc = _evaluate(models[1], out, "--collection", ROOT, "--split", "test", "--split", "train",
                     "--out", train, "parallel=tp1_pp1", nproc=2)
    assert _max_gap(_scores(ckpt_eval[0]), _scores(out)) <= 1e-5
    alone = tmp_path / "train_alone"
    _evaluate(models[1], alone, "--split", "train")
    assert _max_gap(_scores(alone), _scores(train)) <= 1e-5
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (alone, train))
    assert b["split"] == "train" and b["queries"] == a["queries"] and b["pairs"] == a["pairs"]
    assert b["first_stage"] == a["first_stage"]
    assert [line for line in proc.stdout.splitlines() if line.startswith(str(ROOT))] == [
        f"{ROOT} (test)", f"{ROOT} (train)"]


def test_repeated_options_pair_with_the_collections_or_are_refused(models, tmp_path, capsys):
    from megarank.evaluate import main

    with pytest.raises(SystemExit):
        main(["--model", str(models[0]), "--collection", str(ROOT), "--collection", str(ROOT),
              "--out", str(tmp_path / "one")])
    assert "--out was given once for 2 --collection: give it once per --collection" in \
        capsys.readouterr().err
    # a bad second collection stops before any model is built, naming its file
    with pytest.raises(SystemExit, match=r"megarank evaluate: .*nowhere.*"):
        main(["--model", str(tmp_path / "no-model"), "--collection", str(ROOT),
              "--collection", str(tmp_path / "nowhere")])


def test_depth_keeps_the_first_stage_tail_below_the_reranked_top_k(models, ckpt_eval, tmp_path):
    out = tmp_path / "depth"
    stdout = _evaluate(models[0], out, "--top-k", "10", "--depth", "20").stdout
    m = json.loads((out / "metrics.json").read_text())
    run, bm25 = _scores(out), read_trec_run(ROOT / "run.bm25.trec")
    task = read_rerank_task(ROOT, top_k=10, depth=20)
    assert m["pairs"] == 113 * 10 and m["depth"] == 20
    for q, scores in run.items():
        first = task.candidates[q] + task.tail[q]
        order = sorted(scores, key=lambda d: -scores[d])
        # the reranked ten are BM25's top ten; the tail follows in BM25's order
        assert sorted(order[:10]) == sorted(first[:10])
        assert order[10:] == first[10:] == sorted(first[10:], key=lambda d: -bm25[q][d])
    # only the top 10 is reordered: recall at 20 is the first stage's, the head scores are the
    # ones a top-20 rerank gives those pairs
    assert m["megarank"]["R@20"] == m["first_stage"]["R@20"]
    full = _scores(ckpt_eval[0])
    assert max(abs(run[q][d] - full[q][d]) for q in run for d in task.candidates[q]) <= 1e-5
    assert "top 10 of 20 candidates reranked" in stdout


def test_first_stage_row_at_top_100_is_bm25():
    # The row the command prints (prepare + compute_metrics, no model needed) against the known
    # number and against ir-measures on the whole run file.
    task = read_rerank_task(ROOT, top_k=100)
    row, gap = compute_metrics(task.first_stage, task.qrels, 100)
    assert row["nDCG@10"] == pytest.approx(BM25_TEST_NDCG10, abs=1e-3)
    assert gap < 1e-9
    full = ir_measures.calc_aggregate([ir_measures.R @ 100], task.qrels,
                                      read_trec_run(ROOT / "run.bm25.trec"))
    assert row["R@100"] == pytest.approx(full[ir_measures.R @ 100], abs=1e-12)


def test_unknown_document_in_run_stops_before_any_model(tmp_path):
    bad = tmp_path / "bad.trec"
    lines = (ROOT / "run.bm25.trec").read_text().splitlines()
    bad.write_text("\n".join([*lines[:5], "1 Q0 no-such-doc 6 1.0 bm25", *lines[5:]]) + "\n")
    # A model path that does not exist: the run file must be refused first.
    proc = _evaluate(tmp_path / "no-model", tmp_path / "out", "--run", bad, check=False)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "no-such-doc" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_qrels_with_unknown_query_is_refused(tmp_path):
    coll = tmp_path / "coll"
    shutil.copytree(ROOT, coll)
    with open(coll / "qrels.tsv", "a") as f:
        f.write("9999\t1\t1\n")
    proc = run_cli("megarank.evaluate", ["--model", tmp_path / "no-model", "--collection", coll],
                   check=False)
    assert proc.returncode != 0
    assert str(coll / "qrels.tsv") in proc.stderr and "'9999'" in proc.stderr


def test_query_without_candidates_counts_as_zero(models, tmp_path):
    task = read_rerank_task(ROOT, top_k=5)
    gone = next(iter(task.qrels))
    run = tmp_path / "run.trec"
    run.write_text("".join(line + "\n" for line in (ROOT / "run.bm25.trec").read_text()
                           .splitlines() if line.split()[0] != gone))
    out = tmp_path / "out"
    proc = run_cli("megarank.evaluate", ["--model", models[0], "--collection", ROOT, "--run",
                                         run, "--top-k", "5", "--out", out])
    m = json.loads((out / "metrics.json").read_text())
    assert m["queries"]["evaluated"] == 113 and m["queries"]["empty_candidates"] == 1
    assert gone not in _scores(out)
    assert "1 with no candidate (scored 0)" in proc.stdout
    # It stays in the mean: dropping it would give a larger first-stage nDCG@10.
    row, _ = compute_metrics(task.first_stage, task.qrels, 5)
    assert m["first_stage"]["nDCG@10"] == pytest.approx(
        (row["nDCG@10"] * 113 - _ndcg10(task, gone)) / 113, abs=1e-12)


def _ndcg10(task, qid):
    one = {qid: task.qrels[qid]}
    return compute_metrics({qid: task.first_stage[qid]}, one, 5)[0]["nDCG@10"]


def test_mine_with_the_model_as_retriever(models, tmp_path):
    # megarank mine shares evaluate's scoring path; here it re-sorts the BM25 top 10 by the model.
    # Once here and once in a fresh process (another hash seed): the same bytes.
    # run_module's process computes on 2 threads, and a score's last bits depend on the thread
    # count (a GEMM of a few rows, as the pooled last layer's, is split otherwise): this
    # process uses 2 as well.
    outs = [tmp_path / f"{i}.jsonl" for i in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for out, run in zip(outs, (run_cli, run_module), strict=True):
            run("megarank.mine", ["--collection", ROOT, "--out", out, "--retriever", "model",
                                  "--model", models[0], "--depth", "10", "--negatives", "3"])
    finally:
        torch.set_num_threads(threads)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    records = read_triplets(outs[0])
    assert len(records) == 112
    for rec in records:
        assert rec.pos_scores is not None and len(rec.neg_scores) == len(rec.neg) <= 3
        assert list(rec.neg_scores) == sorted(rec.neg_scores, reverse=True)


def test_a_tie_never_favours_the_relevant_document(models, tmp_path):
    # Two documents with the same text get the same score from any model. The relevant one,
    # "a", would win the tie by docid; the one ranking rule puts the non-relevant "b" first, in
    # the metrics, the ir-measures table and the run file alike, as training's evaluation does.
    coll = tmp_path / "tie"
    coll.mkdir()
    text = "the boundary layer of a flat plate in supersonic flow"
    docs = {"a": text, "b": text, "c": "heat transfer in a hypersonic wake"}
    (coll / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in docs.items()))
    (coll / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "boundary layer"}) + "\n")
    (coll / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tb\t0\n")
    (coll / "run.bm25.trec").write_text("q1 Q0 a 1 3.0 bm25\nq1 Q0 b 2 2.0 bm25\n"
                                        "q1 Q0 c 3 1.0 bm25\n")
    out = tmp_path / "out"
    # One pair per forward pass: rows of one batch may differ in the last bit.
    run_cli("megarank.evaluate", ["--model", models[1], "--collection", coll, "--top-k", "2",
                                  "--batch-size", "1", "--out", out])
    m = json.loads((out / "metrics.json").read_text())
    run = _scores(out)
    assert run["q1"]["a"] == run["q1"]["b"]  # the tie is real
    assert m["first_stage"]["RR@10"] == 1.0
    assert m["megarank"]["RR@10"] == 0.5
    ranks = {line.split()[2]: int(line.split()[3])
             for line in (out / "run.megarank.trec").read_text().splitlines()}
    assert ranks == {"b": 1, "a": 2}
    from megarank.eval.metrics import mean_metrics

    assert mean_metrics(run, {"q1": {"a": 1, "b": 0}}, ["MRR@10"]) == {"MRR@10": 0.5}
