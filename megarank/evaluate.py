"""Rerank a first-stage run with a megarank model and compare both rankings with ir-measures.

    megarank evaluate --model MODEL_DIR --collection BEIR_DIR [--run FIRST_STAGE.trec]
        [--split test] [--top-k 100] [--depth D] [--out OUT_DIR] [--batch-size 64]
        [hydra overrides]

MODEL_DIR is a megarank run or checkpoint directory (any TP/PP layout: pass e.g.
``parallel=tp2_pp1`` and run under torchrun) or an exported HF directory with scoring.json. The
top-k candidates of the first-stage run (default BEIR_DIR/run.bm25.trec) are reranked for the
judged queries of the split (all judged queries when the collection has no split.json).
With ``--depth D`` (> k), the first stage's ranks k+1..D stay in the reranked run below the
reranked top k, in their first-stage order, so recall at D is the first stage's while only k
pairs per query are scored. OUT_DIR gets run.megarank.trec and metrics.json; rank 0 prints
first stage vs megarank.

Both rows are computed by ir-measures on the same queries and candidates. Equal scores are ordered
by docid, exactly as the written run file ranks them, so the file and the metrics always agree and
a tie never favours a relevant document. megarank's own metrics recompute the table as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ir_measures
import torch
from tqdm import tqdm

from megarank.data.beir import (
    Collection,
    candidates,
    check_run_against,
    load_collection,
    read_trec_run,
    write_trec_run,
)
from megarank.eval.metrics import Qrels, Run, evaluate, rank_documents

if TYPE_CHECKING:  # both import megatron-core, which the input checks never need
    from megarank.eval.scorer import PairScorer
    from megarank.parallel.runtime import Runtime

RUN_FILE, METRICS_FILE, RUN_TAG = "run.megarank.trec", "metrics.json", "megarank"


@dataclass
class RerankTask:
    """The judged queries of a split, their first-stage candidates, and how many were set aside."""

    collection: Collection
    run_path: Path
    """The first-stage TREC run the candidates come from."""
    split: str | None
    """The split evaluated; None: every judged query (the collection has no split.json)."""
    top_k: int
    """Candidates reranked per query."""
    depth: int
    """First-stage documents kept per query: the reranked top_k, then the rest in order."""
    qrels: Qrels
    """Judgements of the evaluated queries: every metric is a mean over exactly these."""
    candidates: dict[str, list[str]]
    """qid -> first-stage top-k docids, best first (empty when the run has none for the query)."""
    first_stage: Run
    """The first-stage run restricted to those candidates."""
    skipped_unjudged: list[str]
    """Split queries without any judgement: not evaluated."""
    tail: dict[str, list[str]]
    """qid -> first-stage ranks top_k+1..depth, best first: kept below the reranked top_k."""

    @property
    def empty(self) -> list[str]:
        """Evaluated queries with no candidate: they stay in the mean and score 0."""
        return [q for q, docs in self.candidates.items() if not docs]

    def pairs(self) -> list[tuple[str, str]]:
        """(qid, docid) of every candidate, query by query."""
        return [(q, d) for q, docs in self.candidates.items() for d in docs]


def prepare(collection: str | Path, run: str | Path | None = None, split: str | None = None,
            top_k: int = 100, depth: int | None = None) -> RerankTask:
    """Read and check every input (no model is built): the collection, the run and the split.

    ``split=None`` takes ``test`` when the collection has a split.json, else all judged queries.
    Raises ValueError naming the run file when it names an unknown query or document.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    depth = top_k if depth is None else depth
    if depth < top_k:
        raise ValueError(f"--depth ({depth}) must be at least --top-k ({top_k})")
    coll = load_collection(collection)  # rejects qrels naming unknown queries or documents
    run_path = Path(run) if run is not None else coll.root / "run.bm25.trec"
    first_stage = read_trec_run(run_path)
    check_run_against(coll, first_stage, run_path)
    if split is None and coll.split is not None:
        split = "test"
    qids = coll.split_qids(split) if split is not None else list(coll.qrels)
    # A query counts when it has any judgement, relevant or not (as in ir-measures).
    qrels = {q: dict(coll.qrels[q]) for q in qids if coll.qrels.get(q)}
    if not qrels:
        raise ValueError(f"{coll.root}: no judged query in {split or 'the collection'}")
    kept = candidates(first_stage, list(qrels), depth)
    return RerankTask(
        collection=coll, run_path=run_path, split=split, top_k=top_k, depth=depth, qrels=qrels,
        candidates={q: docs[:top_k] for q, docs in kept.items()},
        first_stage={q: {d: first_stage[q][d] for d in docs} for q, docs in kept.items()},
        skipped_unjudged=[q for q in qids if q not in qrels],
        tail={q: docs[top_k:] for q, docs in kept.items()},
    )


def with_tail(reranked: Run, tail: dict[str, list[str]]) -> Run:
    """The reranked run with each query's tail appended below it in first-stage order: scores
    1, 2, ... under the lowest reranked score (or under 0 when nothing was reranked)."""
    out = {}
    for q, scores in reranked.items():
        floor = min(scores.values(), default=0.0)
        rest = tail.get(q, [])
        out[q] = {**scores, **{d: floor - 1.0 - i for i, d in enumerate(rest)}}
    return out


def measures(top_k: int) -> list[Any]:
    """The ir-measures of the table: nDCG@10, RR@10, R@100, R@top_k (when not 100) and AP."""
    from ir_measures import AP, RR, R, nDCG

    recall = [R @ 100] if top_k == 100 else [R @ 100, R @ top_k]
    return [nDCG @ 10, RR @ 10, *recall, AP]


# ir-measures name -> megarank.eval.metrics name (cross-check) and table heading.
_OWN_NAME = {"nDCG": "NDCG", "RR": "MRR", "R": "Recall", "AP": "MAP"}
_HEADING = {"nDCG": "NDCG", "RR": "MRR", "R": "R", "AP": "MAP"}


def _renamed(name: str, names: dict[str, str]) -> str:
    """'nDCG@10' -> names['nDCG'] + '@10'."""
    base, at, cutoff = name.partition("@")
    return names[base] + at + cutoff


def ranks_as_scores(run: Run) -> Run:
    """The run with scores replaced by descending rank values, so no two scores tie.

    The order is ``rank_documents`` without qrels (score, then docid), the order write_trec_run
    writes: ir-measures would otherwise break ties its own way and disagree with the file.
    """
    return {q: {d: float(len(s) - i) for i, d in enumerate(rank_documents(s))}
            for q, s in run.items()}


def compute_metrics(run: Run, qrels: Qrels, top_k: int) -> tuple[dict[str, float], float]:
    """(ir-measures means over the judged queries, largest gap to megarank's own metrics)."""
    ranked = ranks_as_scores(run)
    ms = measures(top_k)
    agg = ir_measures.calc_aggregate(ms, qrels, ranked)
    table = {str(m): float(agg[m]) for m in ms}
    own_names = {n: _renamed(n, _OWN_NAME) for n in table}
    own = evaluate(ranked, qrels, list(own_names.values()))
    gap = max(abs(table[n] - own[own_names[n]]) for n in table)
    return table, gap


def score_pairs(scorer: PairScorer, model: torch.nn.Module, rt: Runtime,
                pairs: list[tuple[str, str]], desc: str = "score",
                progress: bool = True) -> torch.Tensor:
    """PairScorer.score with a progress bar on rank 0: pairs go in chunks of whole batches, so
    every batch, and hence every score, is the one a single call would give. [len(pairs)]"""
    if not pairs:
        return torch.zeros(0)
    # Several batches per data-parallel rank per chunk keeps every rank busy between bar updates.
    chunk = scorer.batch_size * rt.dp_size * 4
    out = []
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not (progress and rt.is_main),
              file=sys.stderr, dynamic_ncols=True) as bar:
        for i in range(0, len(pairs), chunk):
            out.append(scorer.score(model, rt, pairs[i:i + chunk]))
            bar.update(len(out[-1]))
    return torch.cat(out)


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)`` then rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def evaluate_model(model_dir: str | Path, collection: str | Path, run: str | Path | None = None,
                   split: str | None = None, top_k: int = 100, out_dir: str | Path | None = None,
                   batch_size: int = 64, overrides: Sequence[str] = (),
                   verbose: bool = False) -> dict[str, Any]:
    """Rerank ``run``'s top-k for the split's judged queries with the model and measure both.

    Every input is checked (``prepare``) before the model is built. Runs in this process, or on
    every rank under torchrun (``overrides`` such as ``parallel=tp2_pp1`` set the layout); the
    process group is shut down on return. Rank 0 writes ``out_dir`` (when given) and, with
    ``verbose``, prints the table. Returns the metrics.json record (the same on every rank).
    """
    task = prepare(collection, run, split, top_k)
    return evaluate_task(task, model_dir, out_dir, batch_size, overrides, verbose)


def evaluate_task(task: RerankTask, model_dir: str | Path, out_dir: str | Path | None = None,
                  batch_size: int = 64, overrides: Sequence[str] = (),
                  verbose: bool = False) -> dict[str, Any]:
    """``evaluate_model`` for inputs already read and checked by ``prepare``."""
    from megarank.eval.scorer import PairScorer
    from megarank.parallel.runtime import shutdown
    from megarank.score import load_scorer
    from megarank.training.logs import logger, setup_logging

    pairs = task.pairs()
    try:
        _, rt, model, collator = load_scorer(model_dir, list(overrides),
                                             int(os.environ.get("WORLD_SIZE", "1")))
        setup_logging(rt)
        if task.skipped_unjudged:
            logger.info(f"skipped {len(task.skipped_unjudged)} {task.split} queries without "
                        "judgements")
        if task.empty:
            logger.info(f"{len(task.empty)} judged queries have no candidate in "
                        f"{task.run_path}: they count as 0 in both rows")
        texts = [(task.collection.queries[q], task.collection.corpus[d]) for q, d in pairs]
        scores = score_pairs(PairScorer(collator, batch_size), model, rt, texts, "rerank")
        reranked: Run = {q: {} for q in task.candidates}
        for (q, d), s in zip(pairs, scores.tolist(), strict=True):
            reranked[q][d] = s
        reranked = with_tail(reranked, task.tail)
        result = _summarise(task, reranked, model_dir)
        if rt.is_main:
            if result["cross_check_max_abs_diff"] > 1e-9:
                logger.warning("ir-measures and megarank's metrics disagree by "
                               f"{result['cross_check_max_abs_diff']:.3g}")
            if out_dir is not None:
                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                # The run file first: whatever happens next, the scores are kept.
                _write_atomic(out / RUN_FILE, lambda p: write_trec_run(reranked, p, RUN_TAG))
                _write_atomic(out / METRICS_FILE,
                              lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
            if verbose:
                print(format_table(result), flush=True)
        return result
    finally:
        shutdown()


def _summarise(task: RerankTask, reranked: Run, model_dir: str | Path) -> dict[str, Any]:
    first, gap_first = compute_metrics(task.first_stage, task.qrels, task.depth)
    mega, gap_mega = compute_metrics(reranked, task.qrels, task.depth)
    return {
        "model": str(model_dir),
        "collection": str(task.collection.root),
        "first_stage_run": str(task.run_path),
        "split": task.split,
        "top_k": task.top_k,
        "depth": task.depth,
        "queries": {
            "evaluated": len(task.qrels),
            "skipped_unjudged": len(task.skipped_unjudged),
            "empty_candidates": len(task.empty),
        },
        "pairs": sum(len(d) for d in task.candidates.values()),
        "first_stage": first,
        "megarank": mega,
        "cross_check_max_abs_diff": max(gap_first, gap_mega),
    }


def format_table(result: dict[str, Any]) -> str:
    """First stage vs megarank as a plain-text table, with the query accounting under it."""
    cols = list(result["first_stage"])
    header = [_renamed(c, _HEADING) for c in cols]
    rows = {f"first stage ({Path(result['first_stage_run']).name})": result["first_stage"],
            "megarank": result["megarank"]}
    width = max(len(n) for n in rows) + 2
    lines = ["".ljust(width) + "".join(h.rjust(10) for h in header)]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[c]:10.4f}" for c in cols))
    q = result["queries"]
    lines.append(
        f"{q['evaluated']} queries ({result['split'] or 'all judged'}), top {result['top_k']} "
        + (f"of {result['depth']} " if result["depth"] != result["top_k"] else "")
        + f"candidates reranked; skipped {q['skipped_unjudged']} without judgements; "
        f"{q['empty_candidates']} with no candidate (scored 0)"
    )
    return "\n".join(lines)


def main() -> None:
    """CLI entry (``megarank evaluate`` / ``python -m megarank.evaluate``)."""
    ap = argparse.ArgumentParser(prog="megarank evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="megarank run/checkpoint dir or HF export")
    ap.add_argument("--collection", required=True, help="BEIR-layout folder")
    ap.add_argument("--run", default=None, help="first-stage TREC run (default: run.bm25.trec)")
    ap.add_argument("--split", default=None, help="split.json list (default: test, if any)")
    ap.add_argument("--top-k", type=int, default=100, help="candidates reranked per query")
    ap.add_argument("--depth", type=int, default=None,
                    help="first-stage documents kept per query (default: top-k); those below "
                         "the top k keep their first-stage order under the reranked ones")
    ap.add_argument("--out", default=None, help="folder for run.megarank.trec and metrics.json")
    ap.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. parallel=tp2_pp1")
    args = ap.parse_args()
    try:
        # Input errors are the user's to fix: one line naming the file, not a traceback.
        task = prepare(args.collection, args.run, args.split, args.top_k, args.depth)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"megarank evaluate: {e}") from None
    evaluate_task(task, args.model, args.out, args.batch_size, args.overrides, verbose=True)


if __name__ == "__main__":
    main()
