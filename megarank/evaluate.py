"""Rerank a first-stage run with a megarank model and compare both rankings with ir-measures.

    megarank evaluate --model MODEL_DIR --collection BEIR_DIR [--run FIRST_STAGE.trec]
        [--split test] [--top-k 100] [--depth D] [--out OUT_DIR] [--batch-size 64]
        [--teacher EMBEDDER_DIR] [hydra overrides]

    # several collections (or splits), the model built once:
    megarank evaluate --model MODEL_DIR --collection A --out eval/a --collection B --out eval/b \
        --collection B --split train --out eval/b_train

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

``--collection`` may be given several times: each is one evaluation, all by the same model,
built once (a large model loads once for a suite of collections). ``--run``, ``--split`` and
``--out`` then go with the collections in the order given: once for every collection, or once
each (``--split`` may also be given once for all); the other options are shared.

Both rows are computed by ir-measures on the same queries and candidates, in megarank's one
ranking order (``megarank.data.ranking``: a tie never favours a relevant document), which is also
the rank column of the written run file. megarank's own metrics recompute the table as a check.
This is ``megarank.evaluate_model`` on the command line.
"""

from __future__ import annotations

import argparse

from megarank.api import check_teacher, evaluate_tasks, for_command, rerank_task


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank evaluate`` / ``python -m megarank.evaluate``)."""
    ap = argparse.ArgumentParser(prog="megarank evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="megarank run/checkpoint dir or HF export")
    ap.add_argument("--collection", required=True, action="append",
                    help="BEIR-layout folder (repeat for several evaluations by one model)")
    ap.add_argument("--run", action="append",
                    help="first-stage TREC run (default: run.bm25.trec); one per --collection")
    ap.add_argument("--split", action="append",
                    help="split.json list (default: test, if any); once, or one per --collection")
    ap.add_argument("--top-k", type=int, default=100, help="candidates reranked per query")
    ap.add_argument("--depth", type=int, default=None,
                    help="first-stage documents kept per query (default: top-k); those below "
                         "the top k keep their first-stage order under the reranked ones")
    ap.add_argument("--out", action="append",
                    help="folder for run.megarank.trec and metrics.json; one per --collection")
    ap.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    ap.add_argument("--teacher", default=None,
                    help="sentence-transformers model directory: its cosine ranking as a row")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. parallel=tp2_pp1")
    args = ap.parse_args(argv)
    n = len(args.collection)
    runs = _per_collection(ap, "--run", args.run, n, shared=False)
    splits = _per_collection(ap, "--split", args.split, n, shared=True)
    outs = _per_collection(ap, "--out", args.out, n, shared=False)
    try:
        # Input errors are the user's to fix: one line naming the file, not a traceback; every
        # evaluation's inputs are read before the model is built.
        tasks = [rerank_task(c, r, s, args.top_k, args.depth)
                 for c, r, s in zip(args.collection, runs, splits, strict=True)]
        if args.teacher is not None:
            check_teacher(args.teacher)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"megarank evaluate: {for_command(e)}") from None
    evaluate_tasks(args.model, tasks, outs, batch_size=args.batch_size,
                   overrides=args.overrides, verbose=True, teacher=args.teacher)


def _per_collection(ap: argparse.ArgumentParser, flag: str, given: list[str] | None, n: int,
                    shared: bool) -> list[str | None]:
    """A repeated option's values, one per --collection: none given (None each), one per
    collection, or (``shared``) one for all."""
    if not given:
        return [None] * n
    if len(given) == n:
        return list(given)
    if len(given) == 1 and shared:
        return given * n
    times = "once" if len(given) == 1 else f"{len(given)} times"
    ap.error(f"{flag} was given {times} for {n} --collection: give it "
             + ("once for all, or " if shared else "") + "once per --collection, in their order")


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
