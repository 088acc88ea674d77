"""Every model measured alike: the same candidates, the same scorer, megarank's metrics.

The candidates are megarank's reranking task (``megarank.eval.rerank.read_rerank_task``: the judged test
queries and their BM25 top k). Every trained model, megarank's exports and sentence-transformers'
alike, is scored by ``sentence_transformers.CrossEncoder(dir).predict`` (raw logits); the teacher
by ``megarank.data.mining.dense_rescorer``, the bi-encoder cosine that ``megarank mine
--retriever dense`` writes as teacher scores. Runs are measured by
``megarank.eval.report.compute_metrics`` (ir-measures in megarank's ranking order, cross-checked by
megarank's own metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megarank.data.mining import dense_rescorer
from megarank.data.ranking import Run, build_run
from megarank.eval.report import compute_metrics
from megarank.eval.rerank import RerankTask, read_rerank_task
from vs_st.pairs import count_token_mismatches, cut_query


@dataclass
class EvalSet:
    """One collection's reranking task and its pairs, as each tool is given them."""

    task: RerankTask
    keys: list[tuple[str, str]]
    """(qid, docid) of every candidate, query by query."""
    ours: list[tuple[str, str]]
    """Their (query, document) texts: what megarank's collator reads."""
    theirs: list[tuple[str, str]]
    """The same with each query pre-cut to megarank's query length: what CrossEncoder reads."""


def eval_sets(collections: dict[str, Path], top_k: int, max_queries: int | None,
              tokenizer: Any, max_query_length: int) -> dict[str, EvalSet]:
    """Per collection: the judged test queries (the first ``max_queries``), BM25's top k."""
    out = {}
    for name, path in collections.items():
        task = read_rerank_task(path, split="test", top_k=top_k).restricted(max_queries)
        keys = task.pairs()
        ours = task.texts(keys)
        cut = {q: cut_query(tokenizer, task.collection.queries[q], max_query_length)
               for q in task.qrels}
        theirs = [(cut[q], doc) for (q, _), (_, doc) in zip(keys, ours, strict=True)]
        out[name] = EvalSet(task, keys, ours, theirs)
    return out


def measured(run: Run, s: EvalSet) -> dict[str, float]:
    """NDCG@10 and MRR@10 of ``run`` (ir-measures nDCG@10, RR@10) on the set's queries, and how
    far megarank's own metrics are from ir-measures'."""
    table, gap = compute_metrics(run, s.task.qrels, s.task.top_k)
    return {"NDCG@10": table["nDCG@10"], "MRR@10": table["RR@10"],
            "cross_check_max_abs_diff": gap}


def first_stage(sets: dict[str, EvalSet]) -> dict[str, Any]:
    """The BM25 row: the candidates in their first-stage order."""
    return {name: measured(s.task.first_stage, s) for name, s in sets.items()}


def cross_encoder(model_dir: str, sets: dict[str, EvalSet], max_length: int,
                  collator: Any) -> dict[str, Any]:
    """Rerank each set's candidates with CrossEncoder(model_dir).predict (raw logits); also
    count the pairs CrossEncoder tokenizes otherwise than megarank's collator."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_dir, num_labels=1, max_length=max_length, device="cpu")
    out: dict[str, Any] = {"token_mismatches": 0}
    for name, s in sets.items():
        out["token_mismatches"] += count_token_mismatches(model, collator, s.ours, s.theirs)
        scores = model.predict(s.theirs, batch_size=64, show_progress_bar=False,
                               activation_fn=torch.nn.Identity())
        out[name] = measured(build_run(s.keys, scores, s.task.candidates), s)
    return out


def teacher(embedder_dir: str, sets: dict[str, EvalSet]) -> dict[str, Any]:
    """Rerank each set's candidates by the bi-encoder's cosine similarity: what distillation
    learns from, for reference next to the students."""
    rescore = dense_rescorer(embedder_dir, progress=False)
    return {name: measured(build_run(s.keys, rescore(s.task.collection, s.keys),
                                     s.task.candidates), s)
            for name, s in sets.items()}
