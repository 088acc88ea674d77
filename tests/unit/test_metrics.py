"""Metrics agree with ir-measures on random runs, handle ties pessimistically, match hand sums."""

import math

import ir_measures
import numpy as np
import pytest
from ir_measures import AP, RR, R, nDCG

from megarank.data.ranking import rank_documents
from megarank.eval.metrics import (
    average_precision,
    judged_queries,
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
)

# Our name -> the ir-measures measure it must equal.
MEASURES = {
    "MRR@10": RR @ 10,
    "NDCG@10": nDCG @ 10,
    "NDCG@5": nDCG @ 5,
    "Recall@10": R @ 10,
    "Recall@100": R @ 100,
    "MAP": AP,
}
PER_QUERY = {
    "MRR@10": lambda run, qrels: mrr_at_k(run, qrels, 10),
    "NDCG@10": lambda run, qrels: ndcg_at_k(run, qrels, 10),
    "NDCG@5": lambda run, qrels: ndcg_at_k(run, qrels, 5),
    "Recall@10": lambda run, qrels: recall_at_k(run, qrels, 10),
    "Recall@100": lambda run, qrels: recall_at_k(run, qrels, 100),
    "MAP": average_precision,
}


def random_case(seed: int) -> tuple[dict, dict]:
    """A run and qrels with every awkward case: judged queries missing from the run, run queries
    without judgements, queries judged only non-relevant, negative grades, relevant documents
    never retrieved, and runs both shorter and longer than the cutoffs."""
    rng = np.random.default_rng(seed)
    num_docs = 400
    run, qrels = {}, {}
    for q in range(120):
        qid = f"q{q}"
        pool = rng.choice(num_docs, size=int(rng.integers(20, 200)), replace=False)
        kind = q % 10
        if kind != 0:  # 10% of queries: in the run, never judged
            judged = rng.choice(pool, size=int(rng.integers(1, len(pool))), replace=False)
            # Skewed towards 0 so that some queries have no relevant document at all.
            grades = rng.choice([-1, 0, 0, 0, 1, 2, 3, 4], size=len(judged))
            if kind == 1:
                grades[:] = 0
            qrels[qid] = {f"d{d}": int(g) for d, g in zip(judged, grades, strict=True)}
            # Relevant documents outside the retrieved pool count in recall and AP denominators.
            if kind != 1:
                for d in rng.integers(0, num_docs, size=3):
                    qrels[qid].setdefault(f"d{d}", int(rng.integers(1, 5)))
        if kind != 2:  # 10% of queries: judged, missing from the run
            depth = int(rng.integers(1, len(pool) + 1))
            run[qid] = {
                f"d{d}": float(s) for d, s in zip(pool[:depth], rng.normal(size=depth), strict=True)
            }
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregates_match_ir_measures(seed: int) -> None:
    run, qrels = random_case(seed)
    ours = mean_metrics(run, qrels, list(MEASURES))
    theirs = ir_measures.calc_aggregate(list(MEASURES.values()), qrels, run)
    for name, measure in MEASURES.items():
        assert ours[name] == pytest.approx(theirs[measure], abs=1e-9), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_values_match_ir_measures(seed: int) -> None:
    run, qrels = random_case(seed)
    theirs: dict = {name: {} for name in MEASURES}
    by_measure = {measure: name for name, measure in MEASURES.items()}
    for metric in ir_measures.iter_calc(list(MEASURES.values()), qrels, run):
        theirs[by_measure[metric.measure]][metric.query_id] = metric.value
    for name, fn in PER_QUERY.items():
        ours = fn(run, qrels)
        assert ours.keys() == theirs[name].keys(), name
        for qid, value in ours.items():
            assert value == pytest.approx(theirs[name][qid], abs=1e-9), (name, qid)


def test_query_accounting() -> None:
    run = {"a": {"d1": 1.0}, "b": {"d1": 1.0}, "unjudged": {"d1": 1.0}}
    qrels = {"a": {"d1": 1}, "b": {"d1": 0}, "missing": {"d1": 2}}
    # Averaged over a, b, missing: b (judged, nothing relevant) and missing (not run) score 0.
    assert mean_metrics(run, qrels, ["MRR@10"]) == {"MRR@10": pytest.approx(1 / 3)}
    assert judged_queries(run, qrels) == {
        "judged": 3,
        "judged_in_run": 2,
        "judged_missing_from_run": 1,
        "skipped_queries": 1,
    }


def test_ties_rank_relevant_last() -> None:
    scores = dict.fromkeys(["a", "b", "c", "d", "e"], 0.5)
    qrels = {"q": {"a": 1}}
    # "a" would come first by docid; pessimistic ties put it after every non-relevant document.
    assert rank_documents(scores, qrels["q"]) == ["b", "c", "d", "e", "a"]
    assert mrr_at_k({"q": scores}, qrels, 10) == {"q": pytest.approx(1 / 5)}
    assert average_precision({"q": scores}, qrels) == {"q": pytest.approx(1 / 5)}
    assert mrr_at_k({"q": scores}, qrels, 4) == {"q": 0.0}


def test_ties_order_graded_gains_ascending() -> None:
    scores = {"x": 2.0, "a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}
    assert rank_documents(scores, {"a": 3, "b": 1, "c": -1}) == ["x", "c", "b", "a", "d"]
    # Without judgements ties fall back to docid order: what write_trec_run uses.
    assert rank_documents(scores) == ["x", "a", "b", "c", "d"]


def test_nan_score_is_rejected() -> None:
    with pytest.raises(ValueError, match="'b' has a NaN score"):
        rank_documents({"a": 1.0, "b": math.nan})


def test_hand_computed_example() -> None:
    # Ranking d1 d2 d3 d4 d5; grades d2=2, d4=1, d9=3 (never retrieved), d3=0.
    run = {"q": {"d1": 5.0, "d2": 4.0, "d3": 3.0, "d4": 2.0, "d5": 1.0}}
    qrels = {"q": {"d2": 2, "d3": 0, "d4": 1, "d9": 3}}
    assert mrr_at_k(run, qrels, 10)["q"] == pytest.approx(1 / 2)
    assert mrr_at_k(run, qrels, 1)["q"] == 0.0
    assert recall_at_k(run, qrels, 2)["q"] == pytest.approx(1 / 3)
    assert recall_at_k(run, qrels, 10)["q"] == pytest.approx(2 / 3)
    # Precision at the relevant ranks 2 and 4 is 1/2 and 2/4; d9 is relevant but unretrieved.
    assert average_precision(run, qrels)["q"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(run, qrels, 10)["q"] == pytest.approx(dcg / ideal)
    # At cutoff 2 the ideal ranking is also cut to its top 2.
    assert ndcg_at_k(run, qrels, 2)["q"] == pytest.approx(
        (2 / math.log2(3)) / (3 + 2 / math.log2(3))
    )


def test_perfect_and_empty_rankings() -> None:
    qrels = {"q": {"a": 3, "b": 1, "c": 0}}
    perfect = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    assert mean_metrics(perfect, qrels, ["MRR@10", "NDCG@10", "Recall@10", "MAP"]) == pytest.approx(
        {"MRR@10": 1.0, "NDCG@10": 1.0, "Recall@10": 1.0, "MAP": 1.0}
    )
    assert mean_metrics({}, qrels, ["NDCG@10", "MAP"]) == {"NDCG@10": 0.0, "MAP": 0.0}


def test_metric_names() -> None:
    run, qrels = {"q": {"a": 1.0}}, {"q": {"a": 1}}
    # ir-measures spellings and any case are accepted; keys are the names as given.
    assert mean_metrics(run, qrels, ["RR@10", "ndcg@3", "R@5", "AP"]) == {
        "RR@10": 1.0,
        "ndcg@3": 1.0,
        "R@5": 1.0,
        "AP": 1.0,
    }
    for bad, message in [
        ("P@10", "unknown metric"),
        ("NDCG", "needs a cutoff"),
        ("MAP@10", "takes no cutoff"),
        ("MRR@0", "k must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            mean_metrics(run, qrels, [bad])
    with pytest.raises(ValueError, match="no judged query"):
        mean_metrics(run, {}, ["MAP"])
