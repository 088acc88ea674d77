"""Rerank a first-stage run's top-k candidates with the model being trained, and score the ranking.

The inputs are read and checked by ``megarank.evaluate.prepare``, the same code the evaluate
command uses, so in-training evaluation and ``megarank evaluate`` rank the same candidates.
"""

from __future__ import annotations

import torch

from megarank.data.collate import PairCollator
from megarank.eval.metrics import evaluate
from megarank.eval.scorer import PairScorer
from megarank.evaluate import prepare
from megarank.parallel.runtime import Runtime

METRICS = ("MRR@10", "NDCG@10", "Recall@10")


class RerankEvaluator:
    """Held-out queries of a BEIR collection, their first-stage candidates, and how to score them."""

    def __init__(self, collection_dir: str, run_path: str | None, split: str, top_k: int,
                 max_queries: int | None, collator: PairCollator, batch_size: int,
                 metrics: tuple[str, ...] = METRICS) -> None:
        task = prepare(collection_dir, run_path, split, top_k)
        qids = list(task.qrels)[:max_queries]
        self.collection = task.collection
        self.qrels = {q: task.qrels[q] for q in qids}
        self.pairs = [(q, d) for q in qids for d in task.candidates[q]]
        if not self.pairs:
            raise ValueError(f"{task.run_path}: no candidates for the {split} queries")
        self.scorer = PairScorer(collator, batch_size)
        self.metrics = list(metrics)

    def evaluate(self, model: torch.nn.Module, rt: Runtime) -> dict[str, float]:
        """Rerank and return the metrics (same on every rank)."""
        c = self.collection
        scores = self.scorer.score(model, rt, [(c.queries[q], c.corpus[d]) for q, d in self.pairs])
        run: dict[str, dict[str, float]] = {q: {} for q in self.qrels}
        for (q, d), s in zip(self.pairs, scores.tolist(), strict=True):
            run[q][d] = s
        return evaluate(run, self.qrels, self.metrics)
