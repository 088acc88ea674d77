"""``megarank mine --retriever dense`` under torchrun: every text is embedded once across the
ranks, the BM25 index is built once, and the triplets are byte-identical to one process's.

The one-process minings run in this process, the 2-rank ones as the cases of one launch."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megarank.data.beir import load_collection
from tests.helpers.cases import cli_case, run_cases
from tests.helpers.collections import small_cranfield
from tests.helpers.runs import data_dir, run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = data_dir("cranfield")


def _small_collection(tmp_path, n_queries=8, depth=10):
    root = small_cranfield(tmp_path / "small", n_queries, depth)
    return root, set(load_collection(root).queries.values())


# name -> the worker's extra arguments: plain dense mining; 12 pseudo-queries and BM25 fused
# into the teacher at 0.2.
MINES = {"plain": [], "pseudo": ["12", "0.2"]}


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """(name, ranks) -> (triplets file, every rank's report), for 1 and 2 ranks."""
    tmp = tmp_path_factory.mktemp("mining")
    root, queries = _small_collection(tmp)
    worker = "tests.distributed.dense_mining_worker"

    def args(name, nproc):
        out, report = tmp / f"{name}{nproc}.jsonl", tmp / f"{name}{nproc}"
        report.mkdir()
        return [root, out, report, *MINES[name]]

    for name in MINES:
        run_cli(worker, args(name, 1))
    run_cases({name: cli_case(worker, args(name, 2)) for name in MINES}, nproc=2)
    return queries, {(name, nproc): (tmp / f"{name}{nproc}.jsonl", [
        json.loads((tmp / f"{name}{nproc}" / f"rank{r}.json").read_text())
        for r in range(nproc)]) for name in MINES for nproc in (1, 2)}


def test_dense_mining_embeds_each_document_once_across_two_ranks(mined):
    queries, runs = mined
    one_out, (one,) = runs["plain", 1]
    two_out, ranks = runs["plain", 2]

    def docs(report):
        return [t for t in report["texts"] if t not in queries]

    single = Counter(docs(one))
    assert len(single) > 40 and max(single.values()) == 1  # one process: each text once
    per_rank = [Counter(docs(r)) for r in ranks]
    assert all(len(c) > 0.3 * len(single) for c in per_rank)  # both ranks did a share
    assert not set(per_rank[0]) & set(per_rank[1])            # no text embedded twice
    assert per_rank[0] + per_rank[1] == single                # and every text by someone
    all_queries = Counter(t for r in ranks for t in r["texts"] if t in queries)
    assert set(all_queries) == queries and max(all_queries.values()) == 1
    # BM25: indexed once, on rank 0.
    assert [r["indexes"] for r in ranks] == [one["indexes"], []]
    assert two_out.read_bytes() == one_out.read_bytes()
    rows = [json.loads(line) for line in one_out.read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["neg_scores"]) == 6 for r in rows)


def test_pseudo_queries_and_a_fused_teacher_mine_alike_on_one_and_two_ranks(mined):
    _, runs = mined
    one_out, _ = runs["pseudo", 1]
    two_out, ranks = runs["pseudo", 2]
    assert two_out.read_bytes() == one_out.read_bytes()
    assert [len(r["indexes"]) for r in ranks] == [1, 0]
    rows = [json.loads(line) for line in one_out.read_text().splitlines()]
    assert len(rows) == 8 + 12 and all(len(r["pos"]) == 1 for r in rows[8:])
