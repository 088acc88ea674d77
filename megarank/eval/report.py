"""The evaluation report: the first stage and the reranked run measured by ir-measures on the same
queries, megarank's own metrics as a cross-check, the table, and the files. With a teacher (a
sentence-transformers bi-encoder, the one ``megarank mine --retriever dense`` takes its teacher
scores from), its ranking of the same candidates is a third row.

Both rows are measured on the order of ``megarank.data.ranking.rank_documents`` (equal scores
pessimistically: a tie never favours a relevant document), and the TREC run written ranks by
that same order, so the file's rank column, the table and megarank's metrics always agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ir_measures

from megarank.data.beir import write_trec_run
from megarank.data.ranking import Qrels, Run, build_run, ranks_as_scores
from megarank.errors import ArgumentError
from megarank.eval.metrics import mean_metrics
from megarank.eval.rerank import RerankTask, with_tail

RUN_FILE, METRICS_FILE, RUN_TAG = "run.megarank.trec", "metrics.json", "megarank"
TEACHER_RUN_FILE, TEACHER_TAG = "run.teacher.trec", "teacher"

# ir-measures name -> megarank.eval.metrics name (cross-check) and table heading.
_OWN_NAME = {"nDCG": "NDCG", "RR": "MRR", "R": "Recall", "AP": "MAP"}
_HEADING = {"nDCG": "NDCG", "RR": "MRR", "R": "R", "AP": "MAP"}


def measures(top_k: int) -> list[Any]:
    """The ir-measures of the table: nDCG@10, RR@10, R@100, R@top_k (when not 100) and AP."""
    from ir_measures import AP, RR, R, nDCG

    recall = [R @ 100] if top_k == 100 else [R @ 100, R @ top_k]
    return [nDCG @ 10, RR @ 10, *recall, AP]


def _renamed(name: str, names: dict[str, str]) -> str:
    """'nDCG@10' -> names['nDCG'] + '@10'."""
    base, at, cutoff = name.partition("@")
    return names[base] + at + cutoff


def compute_metrics(run: Run, qrels: Qrels, top_k: int) -> tuple[dict[str, float], float]:
    """(ir-measures means over the judged queries, largest gap to megarank's own metrics)."""
    ranked = ranks_as_scores(run, qrels)
    ms = measures(top_k)
    agg = ir_measures.calc_aggregate(ms, qrels, ranked)
    table = {str(m): float(agg[m]) for m in ms}
    own_names = {n: _renamed(n, _OWN_NAME) for n in table}
    own = mean_metrics(run, qrels, list(own_names.values()))
    gap = max(abs(table[n] - own[own_names[n]]) for n in table)
    return table, gap


def check_teacher(teacher: str | Path) -> Path:
    """The teacher's directory, or an ArgumentError naming it: a sentence-transformers model
    directory (a name that is not a directory would be looked up on a model hub)."""
    path = Path(teacher)
    if not path.is_dir():
        raise ArgumentError("{0} {path}: not a directory (a sentence-transformers model "
                            "directory, e.g. all-MiniLM-L6-v2)", "teacher", path=teacher)
    return path


def teacher_run(task: RerankTask, teacher: str | Path, batch_size: int = 64,
                progress: bool = False) -> Run:
    """The task's candidates ranked by the teacher: the cosine similarity of a
    sentence-transformers bi-encoder (``megarank.data.mining.dense_rescorer``, the scores the
    main job distils), with the first stage's tail kept below them as for the model."""
    return teacher_runs([task], teacher, batch_size, progress)[0]


def teacher_runs(tasks: list[RerankTask], teacher: str | Path, batch_size: int = 64,
                 progress: bool = False) -> list[Run]:
    """:func:`teacher_run` of each task, the bi-encoder loaded once."""
    from megarank.data.mining import dense_rescorer

    rescore = dense_rescorer(check_teacher(teacher), batch_size, progress)
    runs = []
    for task in tasks:
        keys = task.pairs()
        scores = rescore(task.collection, keys) if keys else []
        runs.append(with_tail(build_run(keys, scores, task.candidates), task.tail))
    return runs


def summarise(task: RerankTask, reranked: Run, model: str, teacher: Run | None = None,
              teacher_model: str | None = None) -> dict[str, Any]:
    """The metrics.json record: the first stage's and the model's rows (and the teacher's when
    given), the inputs, and the query accounting."""
    first, gap_first = compute_metrics(task.first_stage, task.qrels, task.depth)
    mega, gap_mega = compute_metrics(reranked, task.qrels, task.depth)
    extra: dict[str, Any] = {}
    gap_teacher = 0.0
    if teacher is not None:
        extra["teacher"], gap_teacher = compute_metrics(teacher, task.qrels, task.depth)
        extra["teacher_model"] = teacher_model
    return {
        "model": model,
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
        **extra,
        "cross_check_max_abs_diff": max(gap_first, gap_mega, gap_teacher),
    }


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)`` then rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_report(out_dir: str | Path, reranked: Run, qrels: Qrels, result: dict[str, Any],
                 teacher: Run | None = None) -> None:
    """``run.megarank.trec`` (ranked by the rule the metrics use), ``run.teacher.trec`` with a
    teacher, then ``metrics.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The run files first: whatever happens next, the scores are kept.
    _write_atomic(out / RUN_FILE, lambda p: write_trec_run(reranked, p, RUN_TAG, qrels))
    if teacher is not None:
        _write_atomic(out / TEACHER_RUN_FILE,
                      lambda p: write_trec_run(teacher, p, TEACHER_TAG, qrels))
    _write_atomic(out / METRICS_FILE, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))


def format_table(result: dict[str, Any]) -> str:
    """First stage vs megarank (vs the teacher, when measured) as a plain-text table, with the
    query accounting under it."""
    cols = list(result["first_stage"])
    header = [_renamed(c, _HEADING) for c in cols]
    rows = {f"first stage ({Path(result['first_stage_run']).name})": result["first_stage"],
            "megarank": result["megarank"]}
    if "teacher" in result:
        teacher = Path(result["teacher_model"])
        rows[f"teacher ({teacher.parent.name}/{teacher.name})"] = result["teacher"]
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
