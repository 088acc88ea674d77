"""Ranking metrics as pure functions, equal to ir-measures (checked in tests/unit/test_metrics.py).

Definitions mirror `ir_measures` 0.4.3 with its default providers:

- ``MRR@k`` = ``RR@k`` (msmarco provider): 1 / rank of the first document with rel >= 1 in
  the top k.
- ``NDCG@k`` = ``nDCG@k`` (pytrec_eval ``ndcg_cut_k``): linear gain ``max(rel, 0)`` (negative
  grades give no gain, as in trec_eval), discount ``log2(rank + 1)``; the ideal ranking is built
  from every judged document of the query, not only the retrieved ones.
- ``Recall@k`` = ``R@k`` (pytrec_eval ``recall_k``): relevant in the top k / all relevant of
  the query.
- ``MAP`` = ``AP`` (pytrec_eval ``map``): mean of precision at each relevant retrieved
  document, divided by all relevant of the query (relevant documents never retrieved add 0).

Which queries count, again as in ir-measures: every query that has at least one judgement in the
qrels (of any grade, so a query judged only non-relevant counts and scores 0). A judged query
missing from the run scores 0; run queries without judgements are skipped. Pass qrels restricted
to the queries you evaluate (e.g. the ``test`` split), or other judged queries count as 0.

Ties: documents are ordered by megarank's one ranking rule, ``megarank.data.ranking``: equal
scores pessimistically (lowest gain first), so a model that gives many documents the same score
(a collapsed head) can never profit from ties. With distinct scores trec_eval agrees exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from megarank.data.ranking import RELEVANCE_THRESHOLD, Qrels, Run, rank_documents

# One query's metric from its ranked docids and its judgements.
_QueryMetric = Callable[[list[str], dict[str, int]], float]


def _num_relevant(qrels_q: dict[str, int]) -> int:
    return sum(1 for rel in qrels_q.values() if rel >= RELEVANCE_THRESHOLD)


def _rr(ranking: list[str], qrels_q: dict[str, int], k: int) -> float:
    for rank, docid in enumerate(ranking[:k], start=1):
        if qrels_q.get(docid, 0) >= RELEVANCE_THRESHOLD:
            return 1.0 / rank
    return 0.0


def _ndcg(ranking: list[str], qrels_q: dict[str, int], k: int) -> float:
    # Gains are the grades themselves (trec_eval ndcg_cut), not 2**rel - 1 as in some toolkits.
    dcg = sum(
        max(qrels_q.get(docid, 0), 0) / math.log2(rank + 1)
        for rank, docid in enumerate(ranking[:k], start=1)
    )
    ideal_gains = sorted((rel for rel in qrels_q.values() if rel > 0), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 1) for rank, gain in enumerate(ideal_gains, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def _recall(ranking: list[str], qrels_q: dict[str, int], k: int) -> float:
    num_rel = _num_relevant(qrels_q)
    if num_rel == 0:
        return 0.0
    hits = sum(1 for docid in ranking[:k] if qrels_q.get(docid, 0) >= RELEVANCE_THRESHOLD)
    return hits / num_rel


def _ap(ranking: list[str], qrels_q: dict[str, int]) -> float:
    num_rel = _num_relevant(qrels_q)
    if num_rel == 0:
        return 0.0
    hits = 0
    precision_sum = 0.0
    for rank, docid in enumerate(ranking, start=1):
        if qrels_q.get(docid, 0) >= RELEVANCE_THRESHOLD:
            hits += 1
            precision_sum += hits / rank
    return precision_sum / num_rel


def _judged(qrels: Qrels) -> list[str]:
    return [qid for qid, judged in qrels.items() if judged]


def _per_query(run: Run, qrels: Qrels, metric: _QueryMetric) -> dict[str, float]:
    values = {}
    for qid in _judged(qrels):
        ranking = rank_documents(run.get(qid, {}), qrels[qid])
        values[qid] = metric(ranking, qrels[qid])
    return values


def _check_cutoff(k: int) -> None:
    if k < 1:
        raise ValueError(f"cutoff k must be >= 1, got {k}")


def mrr_at_k(run: Run, qrels: Qrels, k: int) -> dict[str, float]:
    """Reciprocal rank of the first relevant document within the top ``k``, per judged query."""
    _check_cutoff(k)
    return _per_query(run, qrels, lambda ranking, q: _rr(ranking, q, k))


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> dict[str, float]:
    """nDCG@k with linear gains and log2 discount (trec_eval ``ndcg_cut``), per judged query."""
    _check_cutoff(k)
    return _per_query(run, qrels, lambda ranking, q: _ndcg(ranking, q, k))


def recall_at_k(run: Run, qrels: Qrels, k: int) -> dict[str, float]:
    """Relevant documents in the top ``k`` over all relevant documents, per judged query."""
    _check_cutoff(k)
    return _per_query(run, qrels, lambda ranking, q: _recall(ranking, q, k))


def average_precision(run: Run, qrels: Qrels) -> dict[str, float]:
    """Average precision over the whole ranking (trec_eval ``map``), per judged query."""
    return _per_query(run, qrels, _ap)


# Accepted spellings (lower-cased) -> (metric, whether it takes a cutoff).
_METRICS: dict[str, tuple[str, bool]] = {
    "mrr": ("rr", True),
    "rr": ("rr", True),
    "ndcg": ("ndcg", True),
    "recall": ("recall", True),
    "r": ("recall", True),
    "map": ("ap", False),
    "ap": ("ap", False),
}
_NAME_RE = re.compile(r"^([A-Za-z]+)(?:@(\d+))?$")


def _parse_metric(name: str) -> _QueryMetric:
    match = _NAME_RE.match(name)
    spec = _METRICS.get(match.group(1).lower()) if match else None
    if spec is None:
        raise ValueError(
            f"unknown metric {name!r}; expected one of MRR@k, NDCG@k, Recall@k, MAP"
            " (aliases RR@k, nDCG@k, R@k, AP)"
        )
    kind, takes_cutoff = spec
    cutoff = match.group(2)
    if takes_cutoff and cutoff is None:
        raise ValueError(f"metric {name!r} needs a cutoff, e.g. {match.group(1)}@10")
    if not takes_cutoff and cutoff is not None:
        raise ValueError(f"metric {name!r} takes no cutoff")
    if kind == "ap":
        return _ap
    k = int(cutoff)
    _check_cutoff(k)
    fn = {"rr": _rr, "ndcg": _ndcg, "recall": _recall}[kind]
    return lambda ranking, q: fn(ranking, q, k)


def mean_metrics(run: Run, qrels: Qrels, metrics: list[str]) -> dict[str, float]:
    """Mean of each metric over the judged queries, keyed by the names as given.

    Names: ``MRR@k``, ``NDCG@k``, ``Recall@k``, ``MAP`` (case-insensitive; ir-measures spellings
    ``RR@k``, ``nDCG@k``, ``R@k``, ``AP`` also work). Query accounting follows ir-measures (see the
    module docstring); ``judged_queries`` reports the counts. Raises ValueError on an unknown name
    or when ``qrels`` hold no judged query (the mean would be undefined).
    """
    parsed = {name: _parse_metric(name) for name in metrics}
    qids = _judged(qrels)
    if not qids:
        raise ValueError("qrels hold no judged query, so metric means are undefined")
    sums = dict.fromkeys(parsed, 0.0)
    for qid in qids:
        # Rank once per query and reuse it for every metric.
        ranking = rank_documents(run.get(qid, {}), qrels[qid])
        for name, metric in parsed.items():
            sums[name] += metric(ranking, qrels[qid])
    return {name: total / len(qids) for name, total in sums.items()}


def judged_queries(run: Run, qrels: Qrels) -> dict[str, int]:
    """Count how ``mean_metrics`` treats the queries of ``run`` and ``qrels``.

    Keys: ``judged`` (queries averaged over), ``judged_in_run``, ``judged_missing_from_run``
    (scored 0) and ``skipped_queries`` (run queries without judgements, ignored).
    """
    judged = set(_judged(qrels))
    in_run = {qid for qid, scores in run.items() if scores}
    return {
        "judged": len(judged),
        "judged_in_run": len(judged & in_run),
        "judged_missing_from_run": len(judged - in_run),
        "skipped_queries": len(set(run) - judged),
    }
