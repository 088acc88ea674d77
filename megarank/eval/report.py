"""Print a run's evaluation next to the first-stage ranking it reranked.

``python -m megarank.eval.report RUN_DIR`` reads RUN_DIR/config.yaml and metrics.jsonl, computes the
first-stage (e.g. BM25) metrics on the same queries and candidates, prints a table and writes
RUN_DIR/report.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from megarank.data.beir import candidates, load_collection, read_trec_run
from megarank.eval.metrics import evaluate
from megarank.eval.rerank import METRICS


def first_stage_metrics(data_cfg) -> dict[str, float]:
    """Metrics of the first-stage run restricted to the candidates a run reranks."""
    coll = load_collection(data_cfg.eval_collection)
    run = read_trec_run(data_cfg.eval_run or str(Path(data_cfg.eval_collection) / "run.bm25.trec"))
    qids = coll.split_qids(data_cfg.eval_split)
    if data_cfg.eval_max_queries is not None:
        qids = qids[: data_cfg.eval_max_queries]
    cands = candidates(run, qids, data_cfg.eval_top_k)
    qrels = {q: r for q, r in coll.split_qrels(data_cfg.eval_split).items() if q in qids}
    return evaluate({q: {d: run[q][d] for d in cands[q]} for q in qids}, qrels, list(METRICS))


def report(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """{row name: metrics} for the first stage, the starting model and the trained model."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no evaluation")
    rows = {"first stage (BM25)": first_stage_metrics(cfg.data)}
    strip = lambda r: {k[5:]: v for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
    if evals[0]["step"] == 0 and len(evals) > 1:
        rows["megarank, step 0"] = strip(evals[0])
    rows[f"megarank, step {evals[-1]['step']}"] = strip(evals[-1])
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table, metrics as columns."""
    cols = list(next(iter(rows.values())))
    width = max(len(n) for n in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(12) for c in cols)]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[c]:12.4f}" for c in cols))
    return "\n".join(lines)


def main() -> None:
    """CLI: print the table for the run directory given as the only argument."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m megarank.eval.report RUN_DIR")
    rows = report(sys.argv[1])
    print(format_table(rows))
    (Path(sys.argv[1]) / "report.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
