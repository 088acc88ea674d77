"""Reranking a first-stage run: the candidates of a collection's judged queries, scored by a model.

:func:`prepare` reads and checks every input before any model is built; :func:`rerank` scores
the candidates with a model stage and returns the reranked run. Training's held-out evaluation
(:class:`HeldOutEval`) and ``megarank evaluate`` go through both, so they rank the same
candidates by the same rule (``megarank.data.ranking``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megarank.config.validate import EVAL_METRICS as METRICS
from megarank.data.beir import (
    Collection,
    candidates,
    check_run_against,
    load_collection,
    read_trec_run,
)
from megarank.data.collate import PairCollator
from megarank.data.ranking import Qrels, Run, build_run
from megarank.errors import ArgumentError
from megarank.eval.metrics import mean_metrics
from megarank.eval.scorer import PairScorer
from megarank.parallel.runtime import Runtime


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

    def texts(self, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """(query text, document text) of (qid, docid) keys."""
        c = self.collection
        return [(c.queries[q], c.corpus[d]) for q, d in keys]

    def restricted(self, max_queries: int | None) -> RerankTask:
        """The task on its first ``max_queries`` judged queries (all when None)."""
        if max_queries is None:
            return self
        keep = list(self.qrels)[:max_queries]
        return RerankTask(
            self.collection, self.run_path, self.split, self.top_k, self.depth,
            {q: self.qrels[q] for q in keep}, {q: self.candidates[q] for q in keep},
            {q: self.first_stage[q] for q in keep}, self.skipped_unjudged,
            {q: self.tail[q] for q in keep},
        )


def read_rerank_task(collection: str | Path, run: str | Path | None = None, split: str | None = None,
            top_k: int = 100, depth: int | None = None) -> RerankTask:
    """Read and check every input (no model is built): the collection, the run and the split.

    ``split=None`` takes ``test`` when the collection has a split.json, else all judged queries.
    Raises ValueError naming the run file when it names an unknown query or document.
    """
    if top_k < 1:
        raise ArgumentError("{0} must be >= 1, got {value}", "top_k", value=top_k)
    depth = top_k if depth is None else depth
    if depth < top_k:
        raise ArgumentError("{0} ({depth}) must be at least {1} ({top_k})", "depth", "top_k",
                            depth=depth, top_k=top_k)
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


def score_pairs(scorer: PairScorer, model: torch.nn.Module, runtime: Runtime,
                pairs: list[tuple[str, str]], desc: str = "score",
                progress: bool = True) -> torch.Tensor:
    """PairScorer.score with a progress bar on rank 0: pairs go in chunks of whole batches, so
    every batch, and hence every score, is the one a single call would give. [len(pairs)]"""
    if not pairs:
        return torch.zeros(0)
    # Several batches per data-parallel rank per chunk keeps every rank busy between bar updates.
    chunk = scorer.batch_size * runtime.dp_size * 4
    out = []
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not (progress and runtime.is_main),
              file=sys.stderr, dynamic_ncols=True) as bar:
        for i in range(0, len(pairs), chunk):
            out.append(scorer.score(model, runtime, pairs[i:i + chunk]))
            bar.update(len(out[-1]))
    return torch.cat(out)


def rerank(task: RerankTask, model: torch.nn.Module, runtime: Runtime, collator: PairCollator,
           batch_size: int = 64, progress: bool = True, passages: str = "first") -> Run:
    """The task's candidates scored by ``model``, with the first stage's tail kept below them
    (the same run on every rank). ``passages``: FirstP or MaxP (``PairScorer``)."""
    keys = task.pairs()
    scores = score_pairs(PairScorer(collator, batch_size, passages), model, runtime,
                         task.texts(keys), "rerank", progress)
    return with_tail(build_run(keys, scores.tolist(), task.candidates), task.tail)


class HeldOutEval:
    """Training's periodic evaluation: rerank a held-out split's first-stage top k and measure
    MRR@10, NDCG@10 and Recall@10."""

    def __init__(self, collection_dir: str, run_path: str | None, split: str, top_k: int,
                 max_queries: int | None, collator: PairCollator, batch_size: int,
                 metrics: tuple[str, ...] = METRICS, passages: str = "first") -> None:
        self.task = read_rerank_task(collection_dir, run_path, split, top_k).restricted(max_queries)
        if not self.task.pairs():
            raise ValueError(f"{self.task.run_path}: no candidates for the {split} queries")
        self.collator, self.batch_size = collator, batch_size
        self.metrics = list(metrics)
        self.passages = passages

    def run(self, model: torch.nn.Module, runtime: Runtime) -> dict[str, float]:
        """Rerank and return the metrics (the same on every rank)."""
        reranked = rerank(self.task, model, runtime, self.collator, self.batch_size, progress=False,
                          passages=self.passages)
        return mean_metrics(reranked, self.task.qrels, self.metrics)
