"""Several training runs side by side: their training loss and evaluation metrics over steps, as a
table (CSV and markdown) and a plot (PNG), the way experiment trackers show runs.

Each run directory's ``metrics.jsonl`` (``megarank.training.logs.MetricsLog``: one JSON object a
line, each with ``step``) is read as it is. Records of the same step are merged, a later one
winning (a resumed run logs again the steps after its checkpoint, and an evaluation or a save can
come in a record of its own). The curves are ``loss`` and every ``eval/...`` metric any run logged.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megarank.errors import ArgumentError

METRICS_FILE = "metrics.jsonl"
CSV_FILE, MARKDOWN_FILE, PLOT_FILE = "comparison.csv", "comparison.md", "comparison.png"


@dataclass
class RunCurves:
    """One run's curves: metric -> {step: value}."""

    name: str
    """The run's label in the table and the plot."""
    path: Path
    curves: dict[str, dict[int, float]] = field(default_factory=dict)

    def last(self, metric: str) -> tuple[int, float] | None:
        """(step, value) of the metric's last logged step, or None."""
        c = self.curves.get(metric)
        return (max(c), c[max(c)]) if c else None

    def best(self, metric: str) -> tuple[int, float] | None:
        """(step, value) of the best value: the lowest loss, the highest evaluation metric (the
        earliest step on a tie); None when never logged."""
        c = {s: v for s, v in self.curves.get(metric, {}).items() if math.isfinite(v)}
        if not c:
            return None
        sign = 1.0 if metric == "loss" else -1.0
        step = min(c, key=lambda s: (sign * c[s], s))
        return step, c[step]


def read_curves(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """The curves of a run directory's metrics.jsonl.

    Raises FileNotFoundError naming the file when it is missing, and ValueError naming the file
    and line of a record that is not a JSON object with an integer ``step``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a megarank run directory holds one)")
    run = RunCurves(name or Path(run_dir).resolve().name, Path(run_dir))
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg})") from None
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"{path}:{lineno}: a record needs an integer 'step'")
            for key, value in record.items():
                if (key == "loss" or key.startswith("eval/")) and isinstance(value, int | float):
                    run.curves.setdefault(key, {})[step] = float(value)
    if not run.curves:
        raise ValueError(f"{path}: no loss or eval/ metric logged")
    return run


def metric_names(runs: Sequence[RunCurves]) -> list[str]:
    """``loss`` first, then every evaluation metric any run logged, sorted."""
    names = {m for r in runs for m in r.curves}
    return [m for m in ("loss",) if m in names] + sorted(names - {"loss"})


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Labels for the runs: their directory names, or their paths where two names collide."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    paths = [str(Path(d)) for d in run_dirs]
    if len(set(paths)) == len(paths):
        return paths
    return [f"{p} ({i})" for i, p in enumerate(paths, 1)]


def comparison_rows(runs: Sequence[RunCurves]) -> tuple[list[str], list[list[float | int | None]]]:
    """The side-by-side table: header ``step, <run>/<metric> ...`` (each metric's column for
    every run next to each other), one row per step any run logged, None where a run has no
    value at that step."""
    metrics = metric_names(runs)
    header = ["step"] + [f"{r.name}/{m}" for m in metrics for r in runs]
    steps = sorted({s for r in runs for c in r.curves.values() for s in c})
    rows = [[s, *(r.curves.get(m, {}).get(s) for m in metrics for r in runs)] for s in steps]
    return header, rows


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if metric == "loss" else f"{value:.4f}"


def summary_markdown(runs: Sequence[RunCurves]) -> str:
    """A markdown table, one row per run: steps, the last and lowest loss, and each evaluation
    metric's last and best value (with its step)."""
    metrics = metric_names(runs)
    cols = ["run", "steps"]
    for m in metrics:
        cols += [f"{m} last", f"{m} best (step)" if m != "loss" else "loss min (step)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in runs:
        steps = sorted({s for c in r.curves.values() for s in c})
        cells = [r.name, f"{steps[0]}-{steps[-1]}"]
        for m in metrics:
            last, best = r.last(m), r.best(m)
            cells.append(_fmt(last[1], m) if last else "")
            cells.append(f"{_fmt(best[1], m)} ({best[0]})" if best else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(runs: Sequence[RunCurves]) -> str:
    header, rows = comparison_rows(runs)
    col_metrics = [m for m in metric_names(runs) for _ in runs]  # the columns' order
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[0])] + [_fmt(v, m) for v, m in zip(row[1:], col_metrics, strict=True)]
        table.append("| " + " | ".join(cells) + " |")
    sources = "\n".join(f"- `{r.name}`: {r.path}" for r in runs)
    return (f"# Runs compared\n\n{sources}\n\n## Summary\n\n{summary_markdown(runs)}\n\n"
            f"## Over steps\n\n" + "\n".join(table) + "\n")


def plot(runs: Sequence[RunCurves], path: str | Path) -> None:
    """One panel per metric (loss, then each evaluation metric), one line per run, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    metrics = metric_names(runs)
    ncols = min(len(metrics), 2)
    nrows = -(-len(metrics) // ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics, strict=False):
        for r in runs:
            c = r.curves.get(m)
            if c:
                steps = sorted(c)
                # evaluation points are sparse: mark them
                ax.plot(steps, [c[s] for s in steps], label=r.name,
                        marker="o" if m != "loss" or len(steps) < 20 else None, markersize=3)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.savefig(path, format="png", dpi=110)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def load_runs(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None
              ) -> list[RunCurves]:
    """Every run's curves, labelled by ``names`` or by :func:`run_names`."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    if names is not None and len(names) != len(run_dirs):
        raise ArgumentError("{0} gives {given} names for {runs} runs", "names",
                            given=len(names), runs=len(run_dirs))
    labels = list(names) if names is not None else run_names(run_dirs)
    return [read_curves(d, n) for d, n in zip(run_dirs, labels, strict=True)]


def write_comparison(runs: Sequence[RunCurves], out_dir: str | Path) -> dict[str, Path]:
    """Write ``comparison.csv`` (every value at full precision), ``comparison.md`` (a summary per
    run, then the same table over steps) and ``comparison.png`` into ``out_dir``. Returns
    {"csv", "markdown", "plot"} -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = comparison_rows(runs)

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([["" if v is None else repr(v) for v in row] for row in rows])

    paths = {"csv": out / CSV_FILE, "markdown": out / MARKDOWN_FILE, "plot": out / PLOT_FILE}
    _atomic(paths["csv"], write_csv)
    _atomic(paths["markdown"], lambda p: p.write_text(_markdown(runs)))
    _atomic(paths["plot"], lambda p: plot(runs, p))
    return paths
