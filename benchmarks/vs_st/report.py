"""The comparison's report: the machine, the markdown table, the ratios and the notes under it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil

COLLECTION_NAMES = {"cranfield": "Cranfield", "cisi": "CISI"}
"""The evaluation collections (shipped with megarank), as the table names them."""
LABELS = {"tp1": "megarank tp1 (DP2)", "tp2": "megarank tp2", "st": "sentence-transformers",
          "teacher": "teacher: all-MiniLM-L6-v2 bi-encoder cosine (not trained here)"}
"""Row key -> row name (the BM25 row is named by its depth)."""
METRICS = ("NDCG@10", "MRR@10")


def machine() -> dict[str, str]:
    """nproc, CPU model, memory and library versions."""
    import megatron.core
    import sentence_transformers
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    # The cores this process may run on (what `nproc` says unless OMP_NUM_THREADS is set).
    nproc = str(len(os.sched_getaffinity(0)))
    return {"nproc": nproc, "cpu": cpu, "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "megatron_core": megatron.core.__version__}


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def table(rows: dict[str, dict[str, Any]], top_k: int) -> str:
    """The markdown table: throughput and memory of training, quality of reranking."""
    head = ["system", "pairs/s whole run", "pairs/s steady state", "peak RSS GiB (tree)",
            "peak RSS GiB (no forks)"]
    head += [f"{COLLECTION_NAMES[c]} {m}" for c in COLLECTION_NAMES for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in rows.items():
        name = f"BM25 top-{top_k} (first stage)" if key == "bm25" else LABELS[key]
        cells = [name, fmt(r.get("pairs_per_s_whole"), 1), fmt(r.get("pairs_per_s_steady"), 1),
                 fmt(r.get("peak_rss_gib"), 2), fmt(r.get("peak_rss_top_gib"), 2)]
        cells += [fmt(r[c][m], 4) for c in COLLECTION_NAMES for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """megarank / sentence-transformers for each layout trained."""
    if "st" not in rows:
        return {}
    st, out = rows["st"], {}
    for key in ("tp1", "tp2"):
        if key in rows:
            r = rows[key]
            out[key] = {
                "pairs_per_s_whole": r["pairs_per_s_whole"] / st["pairs_per_s_whole"],
                "pairs_per_s_steady": r["pairs_per_s_steady"] / st["pairs_per_s_steady"],
                **{f"{c}_NDCG@10": r[c]["NDCG@10"] / st[c]["NDCG@10"] if st[c]["NDCG@10"]
                   else float("nan") for c in COLLECTION_NAMES},
            }
    return out


def print_report(report: dict[str, Any], cores: int) -> None:
    """Settings, machine, the table, the ratios, the training losses, the checks and how busy
    other processes kept the ``cores`` the measured runs were given."""
    settings, rows = report["settings"], report["rows"]
    trained = {k: r for k, r in rows.items() if "loss" in r}
    print("\n## settings")
    for k, v in settings.items():
        print(f"- {k}: {v}")
    print("\n## machine")
    for k, v in report["machine"].items():
        print(f"- {k}: {v}")
    print(f"\n{table(rows, settings['top_k'])}\n")
    for layout, r in report["ratios"].items():
        print(f"{LABELS[layout]} / sentence-transformers: pairs/s whole run "
              f"x{r['pairs_per_s_whole']:.2f}, steady state x{r['pairs_per_s_steady']:.2f}, "
              + ", ".join(f"{c} NDCG@10 x{r[f'{c}_NDCG@10']:.3f}" for c in COLLECTION_NAMES))
    for key, r in trained.items():
        print(f"{LABELS[key]}: train loss step 1 {r['loss'][0]:.4f}, "
              f"step {settings['steps']} {r['loss'][-1]:.4f}")
    print("checks: " + ", ".join(f"{k}={v}" for k, v in report["checks"].items()))
    busy = {LABELS[k]: r["other_cores"] for k, r in trained.items()}
    print("cores kept busy by other processes during each training run: "
          + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
    if any(v > 0.2 for v in busy.values()):
        print(f"WARNING: other work used up to {max(busy.values()):.2f} of the {cores} cores "
              "during a measured run: the throughput numbers are not clean; rerun on an idle "
              "machine (quality numbers are unaffected)")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                        report["stage_seconds"].items()))
    print(f"results: {settings['out']}/results.json")
