"""Rerank a first-stage run's top-k candidates with the model being trained, and score the ranking."""

from __future__ import annotations

from pathlib import Path

import torch

from megarank.data.beir import candidates, check_run_against, load_collection, read_trec_run
from megarank.data.collate import PairCollator
from megarank.eval.metrics import evaluate
from megarank.eval.scorer import PairScorer
from megarank.parallel.runtime import Runtime

METRICS = ("MRR@10", "NDCG@10", "Recall@10")


class RerankEvaluator:
    """Held-out queries of a BEIR collection, their first-stage candidates, and how to score them."""

    def __init__(self, collection_dir: str, run_path: str | None, split: str, top_k: int,
                 max_queries: int | None, collator: PairCollator, batch_size: int,
                 metrics: tuple[str, ...] = METRICS) -> None:
        self.collection = load_collection(collection_dir)
        run_path = run_path or str(Path(collection_dir) / "run.bm25.trec")
        first_stage = read_trec_run(run_path)
        check_run_against(self.collection, first_stage, run_path)
        qids = self.collection.split_qids(split)
        if max_queries is not None:
            qids = qids[:max_queries]
        self.qrels = {q: r for q, r in self.collection.split_qrels(split).items() if q in qids}
        cands = candidates(first_stage, qids, top_k)
        self.pairs = [(q, d) for q in qids for d in cands[q]]
        if not self.pairs:
            raise ValueError(f"{run_path}: no candidates for the {split} queries")
        self.first_stage = {q: {d: first_stage[q][d] for d in cands[q]} for q in qids}
        self.scorer = PairScorer(collator, batch_size)
        self.metrics = list(metrics)

    def baseline(self) -> dict[str, float]:
        """The metrics of the first-stage ranking of the same candidates."""
        return evaluate(self.first_stage, self.qrels, self.metrics)

    def score(self, model: torch.nn.Module, rt: Runtime) -> torch.Tensor:
        """Scores of every candidate pair, [len(pairs)], identical on every rank."""
        c = self.collection
        return self.scorer.score(model, rt, [(c.queries[q], c.corpus[d]) for q, d in self.pairs])

    def run(self, scores: torch.Tensor) -> dict[str, dict[str, float]]:
        """A TREC-style run {qid: {docid: score}} from pair scores."""
        run: dict[str, dict[str, float]] = {}
        for (q, d), s in zip(self.pairs, scores.tolist(), strict=True):
            run.setdefault(q, {})[d] = s
        return run

    def evaluate(self, model: torch.nn.Module, rt: Runtime) -> dict[str, float]:
        """Rerank and return the metrics (same on every rank)."""
        return evaluate(self.run(self.score(model, rt)), self.qrels, self.metrics)
