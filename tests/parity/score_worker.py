"""Worker for parity tests (one process, or a case of ``tests.helpers.cases`` under torchrun):
score batches with megarank models built from HF directories in one TP/PP layout, write rank 0's
scores.

    python -m tests.parity.score_worker OUT.pt PARALLEL JOB [JOB ...]
    JOB = "<hf_dir>|<head>|<batch.pt>"   (head: classifier or yes_no)
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str] | None = None) -> None:
    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.data.batch import PairBatch
    from megarank.eval.scorer import score_batches

    out, parallel, *jobs = sys.argv[1:] if argv is None else argv
    results = []
    bundle = None
    for job in jobs:
        source, head, batch_file = job.split("|")
        cfg = compose(["model=hf", f"model.hf_path={source}", f"parallel={parallel}",
                       f"pair.head={head}"])
        # Every job builds on the runtime the first brought up (same layout).
        bundle = build_bundle(cfg, device="cpu")
        model, runtime = bundle.model, bundle.runtime
        b = torch.load(batch_file)
        pool = b["last"] if bundle.contract.pooling == "last" else torch.zeros_like(b["last"])
        batch = PairBatch(b["input_ids"], b["attention_mask"], b["token_type_ids"], pool, 1,
                          int(b["attention_mask"].sum()))
        # two micro-batches, so pipeline schedules run more than one
        half = batch.input_ids.shape[0] // 2
        parts = [PairBatch(*(t[s] for t in (batch.input_ids, batch.attention_mask,
                                             batch.token_type_ids, batch.pool_index)), 1, 0)
                 for s in (slice(0, half), slice(half, None))]
        results.append(score_batches(model, runtime, parts))
    if bundle.runtime.is_main:
        torch.save(results, out)
    bundle.close()


if __name__ == "__main__":
    main()
