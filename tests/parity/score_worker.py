"""Worker for parity tests, run under torchrun: score batches with megarank models built from
HF directories in one TP/PP layout, write rank 0's scores.

    python -m tests.parity.score_worker OUT.pt PARALLEL JOB [JOB ...]
    JOB = "<hf_dir>|<head>|<batch.pt>"   (head: classifier or yes_no)
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config import compose, validate
    from megarank.data.collate import PairBatch
    from megarank.eval.scorer import score_batches
    from megarank.parallel.runtime import init_runtime, shutdown
    from megarank.training.setup import build_model, build_tokenizer

    out, parallel, *jobs = sys.argv[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = []
    rt = None
    for job in jobs:
        source, head, batch_file = job.split("|")
        cfg = compose(["model=hf", f"model.hf_path={source}", f"parallel={parallel}",
                       f"task.head={head}"])
        apply_hf_config(cfg)
        d = validate(cfg, world)
        if rt is None:
            rt = init_runtime(d.tp, d.pp, cfg.trainer.seed, "cpu")
        tok = build_tokenizer(cfg)
        model, _ = build_model(cfg, rt, tok)
        b = torch.load(batch_file)
        pool = b["last"] if cfg.model.family == "gpt" else torch.zeros_like(b["last"])
        batch = PairBatch(b["input_ids"], b["attention_mask"], b["token_type_ids"], pool, 1,
                          int(b["attention_mask"].sum()))
        # two micro-batches, so pipeline schedules run more than one
        half = batch.input_ids.shape[0] // 2
        parts = [PairBatch(*(t[s] for t in (batch.input_ids, batch.attention_mask,
                                             batch.token_type_ids, batch.pool_index)), 1, 0)
                 for s in (slice(0, half), slice(half, None))]
        results.append(score_batches(model, rt, parts))
    if rt.is_main:
        torch.save(results, out)
    shutdown()


if __name__ == "__main__":
    main()
