"""Training throughput of a ~0.5B decoder reranker on one GPU: kernels, step time, pairs/s,
tokens/s, model TFLOP/s, MFU and peak memory; and the yes/no score-only head against a
full-vocabulary output layer.

    python benchmarks/gpu_decoder.py                 # Qwen2.5-0.5B geometry, bf16, seq 512
    python benchmarks/gpu_decoder.py --smoke         # tiny model on the CPU: checks the script

Random weights, synthetic token data of realistic length (lengths drawn between 60% and 100% of
--seq, right-padded per micro-batch as in training). Runs within a few minutes on an H100/H200
with only PyTorch preinstalled: install megatron-core, hydra-core, transformers and megarank as
wheels first (see benchmarks/RESULTS.md). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _full_vocab_head_class():
    from megatron.core import tensor_parallel

    from megarank.models.heads import YesNoHead, pool

    class _FullVocab(YesNoHead):
        """What an LM-style reranker does: logits over the whole vocabulary at every position
        ([s, b, V], gathered over TP), then the yes/no columns at the pooled token."""

        def forward(self, hidden: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
            logits = hidden @ self.weight().t()  # [s, b, V/tp]
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            picked = pool(logits, pool_index)[:, self.token_ids]  # [b, 2]
            return picked[:, 0].float() - picked[:, 1].float()

    return _FullVocab


def merged(batches: list):
    """One right-padded PairBatch of ``batches``' rows (a step's groups, to cut by tokens)."""
    from megarank.data.batch import PairBatch

    width = max(b.input_ids.shape[1] for b in batches)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(getattr(b, name),
                                                  (0, width - b.input_ids.shape[1]))
                          for b in batches])

    return PairBatch(cat("input_ids"), cat("attention_mask"), cat("token_type_ids"),
                     torch.cat([b.pool_index for b in batches]), batches[0].group_size,
                     sum(b.num_real_tokens for b in batches))


def synthetic_batches(n: int, groups: int, group_size: int, seq: int, vocab: int, seed: int):
    """``n`` PairBatches of ``groups`` x ``group_size`` sequences, lengths 0.6-1.0 x seq."""
    from megarank.data.batch import PairBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = groups * group_size
        lengths = torch.randint(int(0.6 * seq), seq + 1, (rows,), generator=g)
        width = int(lengths.max())
        ids = torch.randint(100, vocab, (rows, width), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        out.append(PairBatch(ids * mask, mask, torch.zeros_like(mask), lengths - 1, group_size,
                             int(lengths.sum())))
    return out


def run(args, head: str, full_vocab: bool, extra: tuple[str, ...] = ()) -> dict:
    """Train ``args.steps`` steps; return the measured row. ``extra``: more overrides (LoRA)."""
    import megarank.models.build as build
    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.models.heads import YesNoHead

    overrides = [f"model={args.model}", f"pair.head={head}", f"task.group_size={args.group_size}",
                 f"trainer.precision={args.precision}", f"pair.max_length={args.seq}",
                 f"trainer.micro_batch_size={args.micro_groups}",
                 f"trainer.global_batch_size={args.micro_groups * args.micro_batches}",
                 f"trainer.max_steps={args.steps + args.warmup}", f"trainer.kernels={args.kernels}",
                 f"trainer.recompute={args.recompute}",
                 # The data is synthetic: the tokenizer only names the yes/no rows of the head,
                 # so the shipped one serves (a hub tokenizer needs a network the GPU may lack).
                 f"model.tokenizer={args.tokenizer}",
                 f"data.packing={str(args.packing).lower()}",
                 f"data.packed_multiple={args.packed_multiple}",
                 *([f"data.tokens_per_micro_batch={args.token_budget}"] if args.token_budget
                   else []),
                 # varlen attention has no dropout; the padded rows run without it too.
                 "model.hidden_dropout=0", "model.attention_dropout=0", *extra]
    build.YesNoHead = _full_vocab_head_class() if full_vocab else YesNoHead
    try:
        # Validates the config for this world (WORLD_SIZE) and brings up the runtime; random
        # weights (no model.hf_path).
        bundle = build_bundle(compose(overrides), load_hf=any("hf_path" in o for o in extra),
                            device=args.device)
    finally:
        build.YesNoHead = YesNoHead
    with bundle:
        return measure(args, bundle, full_vocab)


def measure(args, bundle, full_vocab: bool) -> dict:
    """Time ``args.warmup`` + ``args.steps`` training steps of ``stage`` on synthetic batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarank.parallel.megatron import build_optimizer
    from megarank.training.flops import mfu
    from megarank.training.step import StepCounters, make_forward_step, train_step

    cfg, d, runtime, model = bundle.cfg, bundle.derived, bundle.runtime, bundle.model
    optimizer, scheduler = build_optimizer(cfg, model)
    counters = StepCounters(model=cfg.model, head=cfg.pair.head)
    per_step = args.micro_groups * args.micro_batches  # groups a step (one rank)
    fwd = make_forward_step(cfg.task, runtime.device, counters,
                            groups_per_step=per_step if args.token_budget else None)
    fb = get_forward_backward_func()
    made = synthetic_batches((args.steps + args.warmup) * args.micro_batches,
                             args.micro_groups, args.group_size, args.seq,
                             cfg.model.vocab_size, 0)
    # As training's data path hands them over: a step's micro-batches (cut by tokens with
    # --token-budget), packed when data.packing, pinned for the GPU.
    steps = [made[i:i + args.micro_batches] for i in range(0, len(made), args.micro_batches)]
    if args.token_budget:
        from megarank.data.budget import split_by_tokens

        c = bundle.collator
        steps = [split_by_tokens(merged(s), args.token_budget, c.pad_to_multiple_of,
                                 c.packed_multiple) for s in steps]
    steps = [[bundle.collator.model_layout(b) for b in s] for s in steps]
    if runtime.device.type == "cuda":
        steps = [[b.pin_memory() for b in s] for s in steps]
    shapes = {tuple(b.input_ids.shape) for s in steps for b in s}
    micro = statistics.mean(len(s) for s in steps)
    cuda = runtime.device.type == "cuda"
    times, flops, tokens, padded = [], [], [], []
    cold = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps + args.warmup):
        counters.reset()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(fb, fwd, iter(steps[i]), model, optimizer, scheduler, len(steps[i]),
                   args.seq, d.pairs_per_micro_batch, counters)
        if cuda:
            torch.cuda.synchronize()
        if i < args.warmup:
            cold.append(time.perf_counter() - t0)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            padded.append(counters.padded_tokens)
            flops.append(counters.flops + (
                0.0 if not full_vocab else
                3 * 2 * counters.padded_tokens * cfg.model.hidden_size * cfg.model.vocab_size))
            tokens.append(counters.real_tokens)
    step = statistics.median(times)
    achieved = statistics.median(f / t for f, t in zip(flops, times, strict=True))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    m = mfu(achieved, name) if cuda else None
    return {
        "head": "full-vocab output layer" if full_vocab else cfg.pair.head,
        "kernels": bundle.kernels.name, "step_s": step,
        "pairs_per_s": per_step * args.group_size / step,
        "tokens_per_s": statistics.median(tok / t for tok, t in zip(tokens, times, strict=True)),
        "tflops": achieved / 1e12, "mfu": f"{m[0]:.1%} (peak {m[1]})" if m else "n/a",
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "cold_ratio": (statistics.mean(cold[:20]) / step) if cold else float("nan"),
        "padding": 1 - sum(tokens) / max(sum(padded), 1), "shapes": len(shapes),
        "layout": ("packed" if cfg.data.packing else "padded") + (
            f" x{micro:.1f} (<= {args.token_budget} tokens)" if args.token_budget
            else f" x{args.micro_batches}"),
        "device": name, "reason": bundle.kernels.reason,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2_0p5b")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--micro-groups", type=int, default=2, help="query groups per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"),
                    help="default: the config's trainer.device (auto: CUDA when present)")
    ap.add_argument("--tokenizer", default="${asset:tokenizers/bert-uncased}",
                    help="only names the yes/no rows; default: the tokenizer megarank ships")
    ap.add_argument("--packing", action="store_true",
                    help="data.packing: each micro-batch's pairs end to end in one row")
    ap.add_argument("--packed-multiple", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=None,
                    help="data.tokens_per_micro_batch: each step's groups cut by tokens into "
                         "micro-batches (their number varies) instead of --micro-batches")
    ap.add_argument("--heads", default="classifier,yes_no,full",
                    help="which head rows: classifier, yes_no, full (full-vocabulary yes/no)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, fp32: check the script")
    ap.add_argument("--lora", action="store_true",
                    help="also LoRA r=16 and QLoRA r=16 (NF4 through bitsandbytes) rows, "
                         "classifier head; QLoRA's base is written as a random HF directory")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.precision, args.seq, args.steps, args.warmup = "gpt_tiny", "fp32", 64, 2, 1
        args.micro_batches, args.device = 2, "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    rows = []
    wanted = args.heads.split(",")
    cases = [c for c, name in ((("classifier", False, ()), "classifier"),
                               (("yes_no", False, ()), "yes_no"), (("yes_no", True, ()), "full"))
             if name in wanted]
    if args.lora:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.lora_memory import _random_hf

        tmp = tempfile.mkdtemp()
        hf = _random_hf(args, Path(tmp))
        cases += [("classifier", False, ("peft=lora", "peft.rank=16", "peft.alpha=32")),
                  ("classifier", False, ("peft=qlora", "peft.rank=16", "peft.alpha=32",
                                         "model=hf", f"model.hf_path={hf}",
                                         f"model.tokenizer={args.tokenizer}"))]
    for head, full, extra in cases:
        try:
            row = run(args, head, full, extra)
            if extra:
                row["head"] = f"{head} + {extra[0].split('=')[1]} r=16"
            rows.append(row)
        except torch.OutOfMemoryError as e:  # the full-vocab layer may not fit: that is a result
            rows.append({"head": f"{head}{' full-vocab' if full else ''}", "error": str(e)[:80]})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"\n{args.model}, {args.precision}, seq {args.seq}, {args.micro_groups} groups x "
          f"{args.group_size} docs x {args.micro_batches} micro-batches per step; "
          f"device: {rows[0].get('device')}; kernels: {rows[0].get('kernels')} "
          f"({rows[0].get('reason')})\n")
    print("| head | layout | step s | pairs/s | tokens/s | TFLOP/s | MFU | peak GiB | padding "
          "| shapes | first steps / steady |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['head']} | failed: {r['error']} | | | | | | | | | |")
            continue
        print(f"| {r['head']} | {r['layout']} | {r['step_s']:.3f} | {r['pairs_per_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {r['mfu']} | {r['peak_gib']:.1f} | "
              f"{r['padding']:.1%} | {r['shapes']} | {r['cold_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
