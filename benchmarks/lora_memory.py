"""Full fine-tuning against LoRA (r=16, r=64) and QLoRA (r=16) on a ~0.5B-shaped decoder, one
process: trainable parameters, gradient and optimizer-state bytes, weight bytes, the peak
resident memory of the process and the step time, each row in a fresh process.

    python benchmarks/lora_memory.py                  # Qwen2.5-0.5B geometry, fp32, CPU
    python benchmarks/lora_memory.py --smoke          # gpt_tiny: checks the script

Gradients are megatron DDP's fp32 main-gradient buffers; optimizer state is Adam's two moments
(plus fp32 main weights in bf16); both are measured on the built model after one step
(``megarank.training.memory.measure_stage``). Peak memory is the process's maximum resident set
(``ru_maxrss``). Ratios are against full fine-tuning in the same run. QLoRA reads its base from
an HF directory (it quantizes the weights as they are read), written here with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [("full fine-tune", []), ("LoRA r=16", ["peft=lora", "peft.rank=16", "peft.alpha=32"]),
        ("LoRA r=64", ["peft=lora", "peft.rank=64", "peft.alpha=128"]),
        ("QLoRA r=16", ["peft=qlora", "peft.rank=16", "peft.alpha=32"])]


def _overrides(args) -> list[str]:
    return [f"model={args.model}", "model.tokenizer=${asset:tokenizers/bert-uncased}",
            "trainer.device=cpu", f"trainer.precision={args.precision}",
            f"pair.max_length={args.seq}", "pair.max_query_length=16",
            f"task.group_size={args.group_size}", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=1", "model.hidden_dropout=0.0",
            "model.attention_dropout=0.0"]


def worker(args, extra: list[str], hf_dir: str | None) -> dict:
    """One row: build, measure one step, time ``args.steps`` more."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.training.memory import measure_stage, synthetic_batch
    from megarank.training.step import StepCounters, make_forward_step, train_step

    overrides = _overrides(args) + extra
    if hf_dir is not None:
        overrides += ["model=hf", f"model.hf_path={hf_dir}",
                      "model.tokenizer=${asset:tokenizers/bert-uncased}"]
    cfg = compose(overrides)
    with build_bundle(cfg) as bundle:
        trainable = sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in bundle.model.parameters())
        measured = measure_stage(bundle)
        from megarank.parallel.megatron import build_optimizer

        optimizer, scheduler = build_optimizer(bundle.cfg, bundle.model)
        fwd = make_forward_step(bundle.cfg.task, bundle.runtime.device, StepCounters())
        fb = get_forward_backward_func()
        times = []
        for i in range(args.steps):
            batches = iter([synthetic_batch(bundle.cfg, seed=i)])
            t0 = time.perf_counter()
            train_step(fb, fwd, batches, bundle.model, optimizer, scheduler, 1, args.seq,
                       args.group_size)
            times.append(time.perf_counter() - t0)
        quantized = sum(m.packed.numel() for m in bundle.model.modules()
                        if type(m).__name__ == "QuantizedWeight")
    return {"trainable": trainable, "params": total, "grads": measured.grads,
            "optimizer": measured.optimizer, "weights": measured.weights + quantized,
            "step_s": statistics.median(times),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _random_hf(args, root: Path) -> str:
    """An HF Qwen2 directory with this geometry and random weights (QLoRA's base)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from megarank.config import compose

    m = compose(_overrides(args)).model
    config = Qwen2Config(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                         intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                         num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_query_groups or m.num_attention_heads,
                         max_position_embeddings=4096, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(root / "base")
    return str(root / "base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2_0p5b")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="gpt_tiny: check the script")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.steps = "gpt_tiny", 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker is not None:
        print("ROW " + json.dumps(worker(args, json.loads(args.worker), args.hf)), flush=True)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = None
        for name, extra in ROWS:
            if "peft=qlora" in extra and hf_dir is None:
                hf_dir = _random_hf(args, Path(tmp))
            cmd = [sys.executable, __file__, "--model", args.model, "--precision",
                   args.precision, "--seq", str(args.seq), "--group-size", str(args.group_size),
                   "--steps", str(args.steps), "--worker", json.dumps(extra)]
            if "peft=qlora" in extra:
                cmd += ["--hf", hf_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("ROW ")), None)
            if line is None:
                sys.stderr.write(out.stderr[-3000:])
                raise SystemExit(f"{name}: the worker failed (exit {out.returncode})")
            rows.append((name, json.loads(line[4:])))
    ref = rows[0][1]
    gib = 2**30
    print(f"\n{args.model}, {args.precision}, one process on the CPU, 1 group x "
          f"{args.group_size} docs x {args.seq} tokens per step\n")
    print("| | trainable params | grads GiB | optimizer GiB | weights GiB | peak RSS GiB | "
          "step s | grads+optimizer vs full | peak vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        state = r["grads"] + r["optimizer"]
        print(f"| {name} | {r['trainable']:,} ({r['trainable'] / ref['params']:.2%} of full) | "
              f"{r['grads'] / gib:.4f} | {r['optimizer'] / gib:.4f} | {r['weights'] / gib:.4f} | "
              f"{r['peak_rss'] / gib:.2f} | {r['step_s']:.2f} | "
              f"{state / (ref['grads'] + ref['optimizer']):.4f} | "
              f"{r['peak_rss'] / ref['peak_rss']:.3f} |")


if __name__ == "__main__":
    main()
