"""``megarank score``: score (query, document) pairs with a megarank checkpoint or an HF export.

    megarank score --model CKPT_RUN_OR_HF_DIR --pairs pairs.jsonl --out scores.jsonl [overrides]

``pairs.jsonl`` holds {"query": ..., "document": ...} lines; ``scores.jsonl`` gets one
{"score": ...} line per pair, in order. The model directory's scoring contract (scoring.json)
decides the head, prompt, lengths and padding; run under torchrun to score in a TP/PP/DP layout.
This is ``megarank.load_scorer(...).score(pairs)`` on the command line.
"""

from __future__ import annotations

import argparse
import json

from megarank.api import load_scorer, read_pairs


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank score`` / ``python -m megarank.score``)."""
    ap = argparse.ArgumentParser(prog="megarank score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    pairs = read_pairs(args.pairs)
    with load_scorer(args.model, args.overrides, batch_size=args.batch_size) as scorer:
        scores = scorer.score(pairs)
        if scorer.bundle.runtime.is_main:
            with open(args.out, "w") as f:
                for s in scores:
                    f.write(json.dumps({"score": s}) + "\n")


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
