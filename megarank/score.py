"""Score (query, document) pairs with a megarank checkpoint or an exported HF model.

    megarank score --model CKPT_RUN_OR_HF_DIR --pairs pairs.jsonl --out scores.jsonl [overrides]

``pairs.jsonl`` holds {"query": ..., "document": ...} lines; ``scores.jsonl`` gets one
{"score": ...} line per pair, in order. The model directory's scoring contract (scoring.json)
decides the head, prompt, lengths and padding; run under torchrun to score in a TP/PP/DP layout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from megarank.checkpoint.contract import ScoringContract, make_contract, read_contract


def _apply_contract(cfg: Any, c: ScoringContract) -> None:
    cfg.task.head = c.head
    cfg.data.max_length = c.max_length
    cfg.data.max_query_length = c.max_query_length
    if c.prompt_template is not None:
        cfg.model.prompt_template = c.prompt_template


def load_scorer(model_dir: str | Path, overrides: list[str], world_size: int):
    """(cfg, runtime, model, collator) for a checkpoint/run directory or an HF export."""
    from megarank.checkpoint.dist import (
        META_FILE,
        load_model_weights,
        read_meta,
        resolve_checkpoint,
    )
    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config import compose, from_saved, register, validate
    from megarank.parallel.runtime import init_runtime
    from megarank.training.setup import build_collator, build_model, build_tokenizer

    register()
    path = Path(model_dir)
    is_ckpt = (path / META_FILE).is_file() or (path / "checkpoints").is_dir()
    if is_ckpt:
        path = resolve_checkpoint(path)
        cfg = from_saved(read_meta(path)["config"], overrides)
    else:
        cfg = compose(["model=hf", f"model.hf_path={path.resolve()}", *overrides])
        apply_hf_config(cfg)
    contract = read_contract(path)
    _apply_contract(cfg, contract)
    d = validate(cfg, world_size)
    rt = init_runtime(d.tp, d.pp, cfg.trainer.seed, cfg.trainer.device)
    tokenizer = build_tokenizer(cfg)
    mine = make_contract(cfg, tokenizer)
    if mine != contract:
        raise ValueError(f"{path}/scoring.json does not match how this model would score: "
                         f"saved {contract}, derived {mine}")
    model, _ = build_model(cfg, rt, tokenizer, load_weights=not is_ckpt)
    if is_ckpt:
        load_model_weights(path, model)
    return cfg, rt, model, build_collator(cfg, tokenizer)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(query, document) pairs from JSONL; errors name the file and line."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["query"]), str(row["document"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"query\", \"document\"}}: {e}") from e
    return pairs


def main() -> None:
    """CLI entry (``megarank score`` / ``python -m megarank.score``)."""
    from megarank.eval.scorer import PairScorer
    from megarank.parallel.runtime import shutdown

    ap = argparse.ArgumentParser(prog="megarank score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    pairs = read_pairs(args.pairs)
    cfg, rt, model, collator = load_scorer(args.model, args.overrides,
                                           int(os.environ.get("WORLD_SIZE", "1")))
    try:
        scores: torch.Tensor = PairScorer(collator, args.batch_size).score(model, rt, pairs)
        if rt.is_main:
            with open(args.out, "w") as f:
                for s in scores.tolist():
                    f.write(json.dumps({"score": s}) + "\n")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
