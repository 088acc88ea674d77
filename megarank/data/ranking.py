"""Runs, judgements and the one ranking rule every part of megarank orders documents by.

Training's held-out evaluation, ``megarank evaluate`` (its metrics, the ir-measures table and the
TREC file it writes) and ``megarank mine`` all rank with :func:`rank_documents` and turn
(query, document, score) triples into a run with :func:`build_run`.

The rule: score descending; equal scores pessimistically, lowest gain first (a judged-relevant
document never wins a tie against a non-relevant one), then by docid so the order is
deterministic. Without judgements (mining, a first-stage run) ties go by docid alone. trec_eval
breaks ties by docid, which lets an arbitrary id order decide a metric; here a model that gives
many documents the same score (a collapsed head) can never profit from ties.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Run = dict[str, dict[str, float]]
"""qid -> docid -> score (higher is better)."""
Qrels = dict[str, dict[str, int]]
"""qid -> docid -> graded relevance (<= 0 means not relevant)."""

# rel >= 1 is relevant: the default `rel` of ir-measures and trec_eval's relevance_level.
RELEVANCE_THRESHOLD = 1


def rank_documents(scores: dict[str, float], qrels_q: dict[str, int] | None = None) -> list[str]:
    """The docids of one query, best first, by the rule of the module docstring.

    ``qrels_q``: the query's judgements (unjudged = gain 0). Raises ValueError on a NaN score,
    which would make the sort order undefined.
    """
    qrels_q = qrels_q or {}
    for docid, score in scores.items():
        if math.isnan(score):
            raise ValueError(f"document {docid!r} has a NaN score")
    return sorted(scores, key=lambda d: (-scores[d], max(qrels_q.get(d, 0), 0), d))


def ranks_as_scores(run: Run, qrels: Qrels | None = None) -> Run:
    """The run with each score replaced by a descending rank value, so that no two tie.

    The order is :func:`rank_documents` with the query's judgements: a tool that breaks ties its
    own way (ir-measures, trec_eval) then measures exactly the order megarank ranks by.
    """
    qrels = qrels or {}
    return {q: {d: float(len(s) - i) for i, d in enumerate(rank_documents(s, qrels.get(q)))}
            for q, s in run.items()}


def build_run(keys: Sequence[tuple[str, str]], scores: Iterable[float],
              queries: Iterable[str] = ()) -> Run:
    """(qid, docid) keys and their scores as a run; every qid of ``queries`` is in it, with no
    documents when it has no key (such a query then scores 0)."""
    run: Run = {q: {} for q in queries}
    scores = list(scores)
    if len(scores) != len(keys):
        raise ValueError(f"{len(keys)} (query, document) keys but {len(scores)} scores")
    for (q, d), s in zip(keys, scores, strict=True):
        run.setdefault(q, {})[d] = float(s)
    return run
