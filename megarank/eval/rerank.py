"""Rerank a first-stage run's top-k candidates with the model being trained, and score the ranking.

Pairs are split over data-parallel ranks; each model-parallel group runs them through megatron's
forward-only schedule (so pipeline stages work); scores come back to every rank in one all-reduce.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.data.beir import candidates, check_run_against, load_collection, read_trec_run
from megarank.data.collate import PairBatch, PairCollator
from megarank.eval.metrics import evaluate
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
        self.collator, self.batch_size, self.metrics = collator, batch_size, list(metrics)

    def baseline(self) -> dict[str, float]:
        """The metrics of the first-stage ranking of the same candidates."""
        return evaluate(self.first_stage, self.qrels, self.metrics)

    def _batches(self, lo: int, hi: int) -> list[PairBatch]:
        c = self.collection
        texts = [(c.queries[q], c.corpus[d]) for q, d in self.pairs[lo:hi]]
        return [self.collator.encode_pairs(texts[i:i + self.batch_size])
                for i in range(0, len(texts), self.batch_size)]

    @torch.no_grad()
    def score(self, model: torch.nn.Module, rt: Runtime) -> torch.Tensor:
        """Scores of every pair, [len(pairs)], identical on every rank."""
        n = len(self.pairs)
        per_rank = -(-n // rt.dp_size)
        lo, hi = min(n, rt.dp_rank * per_rank), min(n, (rt.dp_rank + 1) * per_rank)
        batches = self._batches(lo, hi)
        out = torch.zeros(n, dtype=torch.float32, device=rt.device)
        if batches:
            def step(it, m):
                b = next(it).to(rt.device)
                s = m(b.input_ids, b.attention_mask, b.token_type_ids, b.pool_index)
                return s, lambda x: (x.sum() * 0.0, {"scores": x.detach().float()})

            model.eval()
            try:
                results = get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iter(batches), model=[model],
                    num_microbatches=len(batches), seq_length=self.collator.max_length,
                    micro_batch_size=self.batch_size, forward_only=True,
                )
            finally:
                model.train()
            if rt.is_last_stage and rt.tp_rank == 0:
                out[lo:hi] = torch.cat([r["scores"] for r in results])
        dist.all_reduce(out)
        return out.cpu()

    def run(self, scores: torch.Tensor) -> dict[str, dict[str, float]]:
        """A TREC-style run {qid: {docid: score}} from pair scores."""
        run: dict[str, dict[str, float]] = {}
        for (q, d), s in zip(self.pairs, scores.tolist(), strict=True):
            run.setdefault(q, {})[d] = s
        return run

    def evaluate(self, model: torch.nn.Module, rt: Runtime) -> dict[str, float]:
        """Rerank and return the metrics (same on every rank)."""
        return evaluate(self.run(self.score(model, rt)), self.qrels, self.metrics)
