"""``megarank mine``: training triplets with hard negatives from a BEIR collection.

    megarank mine --collection BEIR_DIR --out triplets.jsonl [--split train]
        [--retriever bm25|model|dense] [--model MODEL_DIR] [--depth 100] [--skip-top 0]
        [--negatives 15] [--margin none|FLOAT] [--seed 0] [--batch-size 64]
        [--pseudo-queries N] [--fuse-bm25 W] [--embed-max-length N] [hydra overrides]

Candidates are BM25's top ``depth``, re-sorted by a megarank reranker (``--retriever model``,
under torchrun in any layout) or by a sentence-transformers embedder's cosine (``--retriever
dense``); skip the top ``skip-top``, drop judged positives (and with ``--margin`` near-positives)
and draw ``negatives`` per query, deterministically by seed. The model and dense retrievers
write their scores as FlagEmbedding's ``pos_scores``/``neg_scores`` (teacher scores for
``task.loss=distill``). ``--pseudo-queries N`` adds N documents' first sentences (titles) as
queries, each labelled by that teacher with its source document left out; ``--fuse-bm25 W``
mixes BM25 into the teacher's scores (weight W, per query, on the teacher's scale). The rules are in ``megarank.data.mining``; this is
``megarank.mine_triplets`` on the command line.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from megarank.api import RETRIEVERS, for_command, is_main_process, mine_triplets


def _note(message: str) -> None:
    """A line on stderr from rank 0 only."""
    if is_main_process():
        tqdm.write(f"[megarank mine] {message}", file=sys.stderr)


def _margin(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none or a number, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank mine`` / ``python -m megarank.mine``)."""
    ap = argparse.ArgumentParser(prog="megarank mine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collection", required=True, help="BEIR-layout folder")
    ap.add_argument("--out", required=True, help="triplet JSONL to write")
    ap.add_argument("--split", default=None, help="split.json list (default: train, if any)")
    ap.add_argument("--retriever", choices=RETRIEVERS, default="bm25")
    ap.add_argument("--model", default=None,
                    help="--retriever model: a megarank/HF reranker dir; dense: a "
                         "sentence-transformers embedding model dir")
    ap.add_argument("--depth", type=int, default=100, help="BM25 candidates per query")
    ap.add_argument("--skip-top", type=int, default=0, help="candidate ranks never sampled")
    ap.add_argument("--negatives", type=int, default=15, help="negatives per query")
    ap.add_argument("--margin", type=_margin, default=None,
                    help="drop candidates scoring above (lowest positive - margin); none: off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (model)")
    ap.add_argument("--pseudo-queries", type=int, default=0,
                    help="also this many documents' first sentences as queries, labelled by the "
                         "teacher (--retriever dense|model); 0: judged queries only")
    ap.add_argument("--fuse-bm25", type=float, default=0.0,
                    help="weight of BM25 in a fused teacher (0: the teacher alone)")
    ap.add_argument("--embed-max-length", type=int, default=None,
                    help="tokens of each text the dense embedder reads (default: the "
                         "embedder's own limit; shorter is faster on long documents)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides for the model")
    args = ap.parse_args(argv)
    try:
        stats = mine_triplets(args.collection, args.out, split=args.split,
                              retriever=args.retriever, model=args.model, depth=args.depth,
                              skip_top=args.skip_top, negatives=args.negatives,
                              margin=args.margin, seed=args.seed, batch_size=args.batch_size,
                              overrides=args.overrides, pseudo_queries=args.pseudo_queries,
                              fuse_bm25=args.fuse_bm25,
                              embed_max_length=args.embed_max_length)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"megarank mine: {for_command(e)}") from None
    _note(f"wrote {stats.written} triplets to {args.out}; skipped "
          f"{len(stats.skipped_no_positive)} queries without a relevant document; "
          f"{len(stats.short)} have fewer than {args.negatives} negatives"
          + (f"; {stats.pseudo_written} of the triplets are pseudo-queries' "
             f"({len(stats.skipped_pseudo)} had under two candidates)" if args.pseudo_queries else ""))


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
