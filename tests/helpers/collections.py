"""A small BEIR folder cut from the shipped Cranfield collection, for tests that embed it."""

from __future__ import annotations

import json
from pathlib import Path

from megarank.data.beir import candidates, load_collection, read_trec_run
from tests.helpers.runs import data_dir


def small_cranfield(out: Path, n_queries: int, depth: int) -> Path:
    """``out``: a BEIR folder of the first ``n_queries`` Cranfield train queries (all in its
    train split) over their shipped BM25 top ``depth`` and their judged documents: a few
    hundred documents at most, embedded in seconds."""
    root = data_dir("cranfield")
    coll = load_collection(root)
    run = read_trec_run(root / "run.bm25.trec")
    qids = coll.split_qids("train")[:n_queries]
    top = candidates(run, qids, depth)
    keep = {d for q in qids for d in top[q]} | {d for q in qids for d in coll.qrels[q]}
    out.mkdir(parents=True)
    with open(root / "corpus.jsonl") as src, open(out / "corpus.jsonl", "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["_id"] in keep)
    with open(out / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": q, "text": coll.queries[q]}) + "\n" for q in qids)
    with open(out / "qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{r}\n" for q in qids for d, r in coll.qrels[q].items())
    (out / "split.json").write_text(json.dumps({"train": qids, "test": []}))
    return out
