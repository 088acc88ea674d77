"""Conversion throughput and memory for a ~1B-parameter decoder (or larger), both ways.

    python benchmarks/convert_1b.py [--layers 20] [--hidden 2048 --ffn 5632 --heads 16]
        [--shard-mb 500] [--precision fp32|bf16] [--workdir /tmp/megarank-convert-bench]

Writes a random-weight Llama-architecture HF model (fp32, sharded safetensors), then times
``megarank convert from-hf`` (one process) and ``megarank convert to-hf --max-shard-mb N``,
sampling each process's peak memory, and prints one table. The export streams, so its peak
is compared with its budget: 1.5 x one output shard plus the largest tensor, above the memory
of a process that has only imported what the export imports. No test asserts these numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def write_random_llama(out: Path, layers: int, hidden: int = 2048, ffn: int = 5632,
                       heads: int = 16, kv_heads: int = 8, vocab: int = 32000) -> tuple[int, int]:
    """A random Llama-architecture sequence classifier, one safetensors shard per 4 layers."""
    out.mkdir(parents=True)
    head_dim = hidden // heads
    cfg = dict(model_type="llama", architectures=["LlamaForSequenceClassification"],
               hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
               max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
               tie_word_embeddings=False, num_labels=1, pad_token_id=0, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(REPO / "megarank/assets/tokenizers/bert-uncased", out, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    shards = [{"model.embed_tokens.weight": rnd(vocab, hidden),
               "model.norm.weight": torch.ones(hidden), "score.weight": rnd(1, hidden)}]
    for i in range(layers):
        if i % 4 == 0:
            shards.append({})
        p = f"model.layers.{i}"
        shards[-1].update({
            f"{p}.input_layernorm.weight": torch.ones(hidden),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{p}.self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
            f"{p}.mlp.gate_proj.weight": rnd(ffn, hidden),
            f"{p}.mlp.up_proj.weight": rnd(ffn, hidden),
            f"{p}.mlp.down_proj.weight": rnd(hidden, ffn),
        })
    weight_map, total, params, largest = {}, 0, 0, 0
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * 4
            params += t.numel()
            largest = max(largest, t.numel())
        shard.clear()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    # megarank fuses q/k/v and gate/up: the largest tensor it holds may be one of those.
    head_dim = hidden // heads
    fused = max(2 * ffn * hidden, (heads + 2 * kv_heads) * head_dim * hidden)
    return params, max(largest, fused)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (seconds, peak memory in GiB of the process tree).

    Memory is the sum of PSS (proportional set size) over the tree, sampled every 0.2 s: megatron's
    checkpoint writer forks processes that share the parent's pages, which a sum of RSS would
    count once per process.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return time.perf_counter() - t0, peak / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--shard-mb", type=int, default=500, help="to-hf output shard size")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="the imported checkpoint's precision (bf16 halves it)")
    ap.add_argument("--workdir", default="/tmp/megarank-convert-bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    params, largest = write_random_llama(work / "hf", args.layers, args.hidden, args.ffn,
                                         args.heads, args.kv_heads)
    width = 4 if args.precision == "fp32" else 2
    gib = params * width / 2**30
    print(f"random Llama: {params / 1e9:.2f}B parameters, {gib:.2f} GiB {args.precision} "
          f"(written in {time.perf_counter() - t0:.0f} s)")
    py = [sys.executable, "-m", "megarank.convert"]
    # What the export process holds before it reads a tensor: the interpreter and its imports.
    _, base = timed([sys.executable, "-c", "import megarank.api, megarank.checkpoint.export, "
                     "megarank.checkpoint.stream, megarank.bundle, time; time.sleep(2)"])
    rows = [("from-hf (1 process)", *timed(py + [
                "from-hf", "--hf", str(work / "hf"), "--out", str(work / "ckpt"),
                f"trainer.precision={args.precision}", "trainer.device=cpu"])),
            (f"to-hf (1 process, {args.shard_mb} MB shards)", *timed(py + [
                "to-hf", "--ckpt", str(work / "ckpt"), "--out", str(work / "export"),
                "--max-shard-mb", str(args.shard_mb)]))]
    print("\n| direction | seconds | GiB/s | peak PSS GiB | peak PSS / model size |")
    print("|---|---|---|---|---|")
    for name, sec, peak in rows:
        print(f"| {name} | {sec:.1f} | {gib / sec:.2f} | {peak:.2f} | {peak / gib:.2f} |")
    budget = (1.5 * args.shard_mb * 2**20 + largest * width) / 2**30
    export_peak = rows[1][2] - base
    print(f"\nto-hf above the bare process ({base:.2f} GiB): {export_peak:.2f} GiB; budget "
          f"1.5 x {args.shard_mb} MB shard + largest tensor {largest * width / 2**30:.2f} GiB "
          f"= {budget:.2f} GiB: {export_peak / budget:.2f} of it")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
