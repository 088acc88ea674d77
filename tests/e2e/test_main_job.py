"""The README's main job in a reduced form: a real pretrained 2-layer BERT, a few steps, every
step of the pipeline run, every output written and readable; trained on Cranfield (judged and
pseudo-queries) alone, so that CISI is evaluated unseen.

The job runs in this process (``megarank.quickstart.main``) and so do its one-process steps
(mining, the import, the export): what the job launches under torchrun (training, every
evaluation, 2 ranks) still starts as the job starts it."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file

import megarank.quickstart as quickstart
from megarank.data.beir import load_collection, read_trec_run
from megarank.data.mining import first_sentence
from megarank.data.triplets import read_triplets
from tests.helpers.runs import data_dir, run_cli

pytestmark = pytest.mark.slow


def _one_process_steps_here(launch):
    """quickstart's step runner with its one-process commands run in this process: the same
    printed command, log file, wall time and failure as ``launch``; commands of several ranks go
    to ``launch`` itself."""

    def run(cmd: list[str], nproc: int = 1, log=None) -> float:
        if nproc > 1:
            return launch(cmd, nproc, log)
        t0 = time.perf_counter()
        print(f"$ {' '.join(cmd)}", flush=True)
        proc = run_cli(cmd[0], cmd[1:], check=False)
        if log:
            log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"step failed ({proc.returncode}): {' '.join(cmd)}"
                             + (f"; see {log}" if log else ""))
        return time.perf_counter() - t0

    return run


def test_quickstart_reduced(tmp_path, monkeypatch):
    out = tmp_path / "qs"
    monkeypatch.setattr(quickstart, "_run", _one_process_steps_here(quickstart._run))
    proc = run_cli("megarank.quickstart", [
        "--model", "bert_l2_h128", "--steps", "4", "--top-k", "5", "--embedder",
        "cognition/model", "--pseudo-queries", "20", "--web-pseudo-queries", "10", "--train-on",
        "cranfield", "--embed-max-length", "32", "--out", out], check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cranfield BM25" in proc.stdout and "cisi megarank" in proc.stdout
    assert "cisi teacher" in proc.stdout
    assert "never seen in training (neither queries nor documents): cisi" in proc.stdout

    # mined with the dense retriever: every record carries the teacher scores distill trains on;
    # Cranfield's 112 judged train queries, then its pseudo-queries (titles), no CISI record
    records = read_triplets(out / "data" / "train_triplets.jsonl")
    # the embedder read 32 tokens of each text (--embed-max-length): the mining commands say so
    mines = [line for line in proc.stdout.splitlines() if line.startswith("$ megarank.mine")]
    assert len(mines) == 2 and all("--embed-max-length 32" in line for line in mines), mines
    cranfield = load_collection(data_dir("cranfield"))
    judged = [cranfield.queries[q] for q in cranfield.split_qids("train")]
    web = read_triplets(out / "data" / "web_pseudo10_embed32.jsonl")
    # then the general-domain pseudo-queries (first sentences of the FlagEmbedding passages)
    assert 5 <= len(web) <= 10
    assert [r.query for r in records[-len(web):]] == [r.query for r in web]
    records = records[:-len(web)]
    assert [r.query for r in records[:112]] == judged and 15 <= len(records) - 112 <= 20
    assert all(r.pos_scores and len(r.neg_scores) == len(r.neg) == 31 for r in records[:112])
    titles = {first_sentence(text) for text in cranfield.corpus.values()}
    assert all(r.query in titles and len(r.pos) == len(r.pos_scores) == 1 and r.neg
               for r in records[112:])
    assert (out / "imported" / "megarank.json").is_file()
    latest = (out / "train" / "checkpoints" / "latest").read_text()
    assert latest == "step_0000004"
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps[-1] == 4
    # LoRA (the default): the run's checkpoint holds adapters and head, its base the import
    from megarank.checkpoint.stream import CheckpointTensors

    held = set(CheckpointTensors(out / "train" / "checkpoints" / latest))
    assert held and all(".lora." in n or n.startswith("head.") for n in held)
    weights = load_file(out / "hf" / "model.safetensors")
    assert "classifier.weight" in weights
    for f in ("config.json", "tokenizer.json", "scoring.json"):
        assert (out / "hf" / f).is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["unseen"] == ["cisi"]
    for name in ("cranfield", "cisi"):
        run = read_trec_run(out / "eval" / name / "run.megarank.trec")
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert len(run) == metrics["queries"]["evaluated"] > 0
        # top 5 reranked, BM25's ranks 6-100 kept below them
        assert metrics["pairs"] <= 5 * metrics["queries"]["evaluated"]
        assert all(len(d) <= 100 for d in run.values()) and metrics["depth"] == 100
        assert metrics["megarank"]["R@100"] == metrics["first_stage"]["R@100"]
        # the teacher ranks the same candidates (its run file beside megarank's)
        assert (out / "eval" / name / "run.teacher.trec").is_file()
        for row in ("BM25", "megarank", "teacher"):
            m = results["table"][f"{name} {row}"]
            assert set(m) == {"NDCG@10", "MRR@10", "Recall@100"}
            assert all(0.0 <= v <= 1.0 for v in m.values())
    # CISI was never trained on: its train split is evaluated too, and "cisi all" is the mean
    # over its test and train queries (38 each), weighted by their counts.
    test = json.loads((out / "eval" / "cisi" / "metrics.json").read_text())
    train = json.loads((out / "eval" / "cisi_train" / "metrics.json").read_text())
    assert train["split"] == "train" and not (out / "eval" / "cranfield_train").exists()
    n, m = test["queries"]["evaluated"], train["queries"]["evaluated"]
    for row, key in (("BM25", "first_stage"), ("megarank", "megarank"), ("teacher", "teacher")):
        want = (n * test[key]["nDCG@10"] + m * train[key]["nDCG@10"]) / (n + m)
        assert results["table"][f"cisi all {row}"]["NDCG@10"] == pytest.approx(want, abs=1e-12)
    assert "cisi all megarank" in proc.stdout
