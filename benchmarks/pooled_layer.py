"""What computing the last layer for the pooled rows only saves (``trainer.pooled_last_layer``,
megarank.models.pooling), on the CPU, one thread:

    python benchmarks/pooled_layer.py [--repeats 7] [--models minilm,gpt_tiny] [--smoke]

For each model, two stages built from the same config and seed, one with the pooled last layer
and one computing every row (``trainer.pooled_last_layer=false``), run the same micro-batch in
turn (so the machine's speed, which moves by 15% from minute to minute on a shared virtual
machine, weighs on both alike); the table gives the median of ``--repeats`` rounds of a training
step (forward and backward, dropout as the model has it) and of a scoring forward (no gradient,
as ``megarank score`` runs), and the largest score difference between the two stages in
evaluation mode (they compute the same function). Random weights: the time does not depend on
their values. Micro-batch: 2 groups x 8 pairs x ``--length`` tokens, the vs-sentence-transformers
benchmark's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megarank.bundle import build_bundle
from megarank.config import compose


def _stage(model: str, pooled: bool, length: int):
    cfg = compose([f"model={model}", f"pair.max_length={length}", "trainer.device=cpu",
                   f"pair.max_query_length={min(32, length // 2)}",
                   f"trainer.pooled_last_layer={str(pooled).lower()}"])
    return build_bundle(cfg, load_hf=False, device="cpu")


def _batch(rows: int, length: int, decoder: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    pool = torch.full((rows,), length - 1 if decoder else 0, dtype=torch.long)
    return ids, mask, torch.zeros_like(ids), pool


def _train_step(model, batch) -> float:
    model.train()
    model.zero_grad_buffer()
    start = time.perf_counter()
    model(*batch).float().sum().backward()
    return time.perf_counter() - start


def _score(model, batch) -> float:
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model(*batch)
    return time.perf_counter() - start


def measure(model: str, length: int, repeats: int) -> dict[str, float]:
    """Interleaved medians for one model: train step and scoring forward, full and pooled."""
    with _stage(model, True, length) as pooled, _stage(model, False, length) as full:
        full.model.module.load_state_dict(pooled.model.module.state_dict())
        batch = _batch(16, length, decoder=pooled.cfg.model.family == "gpt")
        times: dict[str, list[float]] = {k: [] for k in ("train full", "train pooled",
                                                          "score full", "score pooled")}
        for _ in range(2):  # warm-up: allocator, oneDNN plans
            _train_step(full.model, batch), _train_step(pooled.model, batch)
        for _ in range(repeats):
            times["train full"].append(_train_step(full.model, batch))
            times["train pooled"].append(_train_step(pooled.model, batch))
            times["score full"].append(_score(full.model, batch))
            times["score pooled"].append(_score(pooled.model, batch))
        full.model.eval(), pooled.model.eval()
        with torch.no_grad():
            diff = (full.model(*batch) - pooled.model(*batch)).abs().max().item()
    out = {k: statistics.median(v) for k, v in times.items()}
    out["max score difference"] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,gpt_tiny")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="bert_tiny, 2 rounds, 32 tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = ["bert_tiny"] if args.smoke else args.models.split(",")
    length, repeats = (32, 2) if args.smoke else (args.length, args.repeats)
    print(f"one thread, micro-batch 16 x {length} tokens, median of {repeats} interleaved rounds")
    print("| model | train step full ms | pooled ms | full / pooled | score full ms | "
          "pooled ms | full / pooled | max score difference |")
    print("|---|---|---|---|---|---|---|---|")
    for model in models:
        r = measure(model, length, repeats)
        print(f"| {model} | {r['train full'] * 1e3:.1f} | {r['train pooled'] * 1e3:.1f} | "
              f"{r['train full'] / r['train pooled']:.2f} | {r['score full'] * 1e3:.1f} | "
              f"{r['score pooled'] * 1e3:.1f} | {r['score full'] / r['score pooled']:.2f} | "
              f"{r['max score difference']:.1e} |")


if __name__ == "__main__":
    main()
