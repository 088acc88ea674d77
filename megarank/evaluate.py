"""Rerank a first-stage run with a megarank model and compare both rankings with ir-measures.

    megarank evaluate --model MODEL_DIR --collection BEIR_DIR [--run FIRST_STAGE.trec]
        [--split test] [--top-k 100] [--depth D] [--out OUT_DIR] [--batch-size 64]
        [--teacher EMBEDDER_DIR] [hydra overrides]

MODEL_DIR is a megarank run or checkpoint directory (any TP/PP layout: pass e.g.
``parallel=tp2_pp1`` and run under torchrun) or an exported HF directory with scoring.json. The
top-k candidates of the first-stage run (default BEIR_DIR/run.bm25.trec) are reranked for the
judged queries of the split (all judged queries when the collection has no split.json).
With ``--depth D`` (> k), the first stage's ranks k+1..D stay in the reranked run below the
reranked top k, in their first-stage order, so recall at D is the first stage's while only k
pairs per query are scored. OUT_DIR gets run.megarank.trec and metrics.json; rank 0 prints
first stage vs megarank. With ``--teacher EMBEDDER_DIR`` (a sentence-transformers model
directory, e.g. the all-MiniLM-L6-v2 the main job distils) the teacher's cosine similarity ranks
the same candidates as a third row, so BM25 / megarank / teacher is one command for any
BEIR-layout collection; OUT_DIR then also gets run.teacher.trec.

Both rows are computed by ir-measures on the same queries and candidates, in megarank's one
ranking order (``megarank.data.ranking``: a tie never favours a relevant document), which is also
the rank column of the written run file. megarank's own metrics recompute the table as a check.
This is ``megarank.evaluate_model`` on the command line.
"""

from __future__ import annotations

import argparse

from megarank.api import check_teacher, evaluate_model, for_command, rerank_task


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank evaluate`` / ``python -m megarank.evaluate``)."""
    ap = argparse.ArgumentParser(prog="megarank evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="megarank run/checkpoint dir or HF export")
    ap.add_argument("--collection", required=True, help="BEIR-layout folder")
    ap.add_argument("--run", default=None, help="first-stage TREC run (default: run.bm25.trec)")
    ap.add_argument("--split", default=None, help="split.json list (default: test, if any)")
    ap.add_argument("--top-k", type=int, default=100, help="candidates reranked per query")
    ap.add_argument("--depth", type=int, default=None,
                    help="first-stage documents kept per query (default: top-k); those below "
                         "the top k keep their first-stage order under the reranked ones")
    ap.add_argument("--out", default=None, help="folder for run.megarank.trec and metrics.json")
    ap.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    ap.add_argument("--teacher", default=None,
                    help="sentence-transformers model directory: its cosine ranking as a row")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. parallel=tp2_pp1")
    args = ap.parse_args(argv)
    try:
        # Input errors are the user's to fix: one line naming the file, not a traceback.
        task = rerank_task(args.collection, args.run, args.split, args.top_k, args.depth)
        if args.teacher is not None:
            check_teacher(args.teacher)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"megarank evaluate: {for_command(e)}") from None
    evaluate_model(args.model, task, out_dir=args.out, batch_size=args.batch_size,
                   overrides=args.overrides, verbose=True, teacher=args.teacher)


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
