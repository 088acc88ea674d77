"""Compare training runs: loss and evaluation metrics over steps, side by side.

    megarank compare RUN_DIR [RUN_DIR ...] --out DIR [--names A B ...]

Reads each run directory's metrics.jsonl and writes DIR/comparison.csv (one row per step, each
metric's column for every run next to each other, full precision), DIR/comparison.md (a summary
per run: last and lowest loss, last and best of each evaluation metric; then the table over
steps) and DIR/comparison.png (one panel per metric, one line per run), and prints the summary.
This is ``megarank.compare_runs`` on the command line.
"""

from __future__ import annotations

import argparse

from megarank.api import compare_runs, for_command


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank compare`` / ``python -m megarank.compare``)."""
    ap = argparse.ArgumentParser(prog="megarank compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl)")
    ap.add_argument("--out", required=True, help="folder for the table and the plot")
    ap.add_argument("--names", nargs="+", default=None,
                    help="labels of the runs, in order (default: their directory names)")
    args = ap.parse_args(argv)
    try:
        paths = compare_runs(args.runs, args.out, args.names, verbose=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"megarank compare: {for_command(e)}") from None
    print("\n".join(f"wrote {p}" for p in paths.values()))


if __name__ == "__main__":
    main()
