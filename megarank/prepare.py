"""``megarank prepare``: triplet JSONL files -> a prepared (tokenized, memory-mapped) dataset.

    megarank prepare --input FILE.jsonl [FILE ...] --out DIR [hydra overrides: model=... pair.max_length=...]

Each distinct query and document is tokenized once with the model's tokenizer and truncation;
groups are stored as index arrays, teacher scores beside them. Train with
``data.train_path=DIR``; a model with another tokenizer or truncation is refused. The output
appears at DIR only once complete. This is ``megarank.prepare_data`` on the command line; the
format is described in ``megarank.data.prepared``.
"""

from __future__ import annotations

import argparse
import os
import sys

from megarank.api import prepare_data


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank prepare`` / ``python -m megarank.prepare``)."""
    ap = argparse.ArgumentParser(prog="megarank prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="triplet JSONL files, in order")
    ap.add_argument("--out", required=True, help="prepared dataset directory to create")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="hydra overrides for the model and data")
    args = ap.parse_args(argv)
    # Texts are tokenized in batches of thousands: the fast tokenizer spreads each batch over
    # every core (its Rust thread pool) unless told otherwise. This process forks nothing.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        stats = prepare_data(args.input, args.out, args.overrides, not args.no_progress)
    except (ValueError, OSError) as e:
        raise SystemExit(f"megarank prepare: {e}") from None
    print(f"[megarank prepare] {stats.groups:,} groups, {stats.distinct_queries:,} queries, "
          f"{stats.distinct_documents:,} distinct of {stats.documents_read:,} documents in "
          f"{stats.seconds:.1f} s ({stats.documents_read / max(stats.seconds, 1e-9):,.0f} docs/s); "
          f"{stats.bytes_on_disk / 1e6:,.1f} MB in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
