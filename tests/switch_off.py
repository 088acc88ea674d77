"""Switch off one feature at a time and name the tests that catch it.

    python tests/switch_off.py [NAME ...]      # all of them when no name is given

Each entry edits one line of the library (an exact text replacement that must match once), runs
the test files that should notice, lists the tests that failed, and puts the line back (also on
Ctrl-C). A feature no test catches is a hole in the suite; the table this prints is kept in
tests/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FEATURES = {
    "tie-rule": (
        "the pessimistic tie rule in ranking (equal scores: relevant documents last)",
        "megarank/data/ranking.py",
        "key=lambda d: (-scores[d], max(qrels_q.get(d, 0), 0), d))",
        "key=lambda d: (-scores[d], d))",
        ["tests/unit/test_metrics.py", "tests/unit/test_mine.py", "tests/integration/test_mine_dense.py",
         "tests/e2e/test_evaluate.py"],
    ),
    "lora-tp-split": (
        "LoRA's tensor-parallel split (every rank takes rank 0's part of A or B)",
        "megarank/models/lora.py",
        "return full.chunk(self.tp_size, dim)[self.tp_rank]",
        "return full.chunk(self.tp_size, dim)[0]",
        ["tests/integration/test_lora.py", "tests/distributed/test_lora_layouts.py"],
    ),
    "dora-magnitude": (
        "DoRA's magnitude rescaling (each row's m / ||W + s B A|| taken as 1: plain LoRA)",
        "megarank/models/dora.py",
        "factor = magnitude / adapter.weight_norm(linear.weight).to(magnitude.dtype)",
        "factor = torch.ones_like(magnitude)",
        ["tests/integration/test_dora.py"],
    ),
    "dora-row-norm-reduce": (
        "DoRA's row norm under TP (a row-parallel rank's norm of its own columns, not reduced)",
        "megarank/models/dora.py",
        'if self.parallel == "row" and self.tp_size > 1:',
        "if False:",
        ["tests/distributed/test_lora_layouts.py"],
    ),
    "dora-init-from": (
        "DoRA's magnitudes set again after model.init_from loads the base (they stay the norms "
        "of the weights the model was built with)",
        "megarank/checkpoint/manager.py",
        "                reset_magnitudes(self.model)\n",
        "",
        ["tests/integration/test_dora.py"],
    ),
    "resume-rng": (
        "resume's RNG restore (Python, NumPy, torch and megatron's tracker states)",
        "megarank/checkpoint/sharded.py",
        "def _restore_rng(state: dict[str, Any], device: torch.device) -> None:\n",
        "def _restore_rng(state: dict[str, Any], device: torch.device) -> None:\n    return\n",
        ["tests/distributed/test_resume.py", "tests/distributed/test_lora_layouts.py"],
    ),
    "non-finite-guard": (
        "the non-finite guard (a step with a non-finite loss or gradient is applied)",
        "megarank/training/step.py",
        "t[5] = bad.double()",
        "t[5] = 0.0",
        ["tests/unit/test_host_syncs.py", "tests/unit/test_losses.py", "tests/e2e/test_faults.py"],
    ),
    "grads-finite-check": (
        "the gradient finite check (every gradient buffer taken as finite)",
        "megarank/parallel/megatron.py",
        "return torch.stack([torch.isfinite(g.sum(dtype=torch.float32)) for g in grads]).all()",
        "return torch.ones((), dtype=torch.bool)",
        ["tests/unit/test_host_syncs.py"],
    ),
    "cpu-dropout-attention": (
        "attention dropout on the CPU through megarank's 16-bit draws (SDPA's math kernel "
        "and its 32-bit draws instead)",
        "megarank/models/attention.py",
        'if dropout_p > 0.0 and q.device.type == "cpu":',
        "if False:",
        ["tests/unit/test_cpu_dropout.py"],
    ),
    "cpu-residual-dropout": (
        "the layers' residual dropout on the CPU through megarank's 16-bit draws (torch's "
        "dropout instead)",
        "megarank/models/dropout.py",
        'if not training or prob == 0.0 or x.device.type != "cpu":',
        "if True:",
        ["tests/unit/test_cpu_dropout.py"],
    ),
    "cpu-half-precision-note": (
        "the start-up note of a half precision on a CPU without native half matmuls (never given)",
        "megarank/parallel/runtime.py",
        "    if supported:\n        return None",
        "    if True:\n        return None",
        ["tests/unit/test_kernels.py"],
    ),
    "pooled-last-layer": (
        "the last layer computed for the pooled rows only (every row computed again)",
        "megarank/models/build.py",
        "    if not (post_process and cfg.trainer.pooled_last_layer):",
        "    if True:",
        ["tests/unit/test_pooled_layer.py"],
    ),
    "pooled-causal-limit": (
        "a pooled query's causal limit (a decoder's pooled token sees the tokens after it)",
        "megarank/models/attention.py",
        "            if causal:\n                before =",
        "            if False:\n                before =",
        ["tests/unit/test_pooled_layer.py"],
    ),
    "cpu-keep-freed-memory": (
        "the CPU allocator setting (freed memory returned to the system, mapped and faulted in "
        "again every step)",
        "megarank/bundle.py",
        "        keep_freed_memory()\n",
        "        pass\n",
        ["tests/e2e/test_cpu_allocator.py"],
    ),
    "megatron-fusers-plain-on-cpu": (
        "megatron's fusable functions left plain without CUDA (each wrapped in torch.compile at "
        "import again, dynamo and inductor imported)",
        "megarank/__init__.py",
        "        module.disable_jit_fuser()\n",
        "        pass\n",
        ["tests/unit/test_kernels.py"],
    ),
    "attention-one-bias": (
        "one additive bias for the causal and padding masks together (each added apart: a "
        "query with every key masked sums two lowest floats to -inf and turns NaN)",
        "megarank/models/attention.py",
        "        allowed = tri if allowed is None else tri & allowed",
        "        scores.add_(torch.zeros(sq, sk).masked_fill_(tri.logical_not(), "
        "torch.finfo(scores.dtype).min))",
        ["tests/unit/test_cpu_dropout.py"],
    ),
    "embed-max-length": (
        "the dense embedder's token limit when mining (mine --embed-max-length: the embedder "
        "reads every text up to its own limit)",
        "megarank/data/mining.py",
        "        embedder.max_seq_length = max_length\n",
        "        pass\n",
        ["tests/integration/test_mine_dense.py"],
    ),
    "tokenize-once": (
        "a text that occurs more than once tokenized once (every occurrence tokenized again)",
        "megarank/data/templates.py",
        '    ids = tokenize(tokenizer, unique, **cut)["input_ids"]\n',
        '    ids = tokenize(tokenizer, list(texts), **cut)["input_ids"]\n'
        "    of_text = list(range(len(texts)))\n",
        ["tests/unit/test_data.py"],
    ),
    "varlen-causal-window": (
        "causality in the CUDA varlen attention call (every packed pair attends both ways)",
        "megarank/models/attention.py",
        'return {"window_size": (-1, 0) if causal else (-1, -1)}',
        'return {"window_size": (-1, -1)}',
        ["tests/unit/test_packing.py"],
    ),
    "embedding-rows-into-main-grad": (
        "the word embedding's rows added straight into megatron's gradient buffer on the CPU "
        "(torch's dense backward and the DDP hook instead)",
        "megarank/models/build.py",
        "        embedding_grad.install(backbone)\n",
        "        pass\n",
        ["tests/unit/test_embedding_grad.py"],
    ),
    "bert-qkv-names": (
        "the HF name mapping of BERT-family attention (query and key swapped on the way in "
        "and out)",
        "megarank/checkpoint/hf_mappings.py",
        'for n in ("query", "key", "value")), "qkv")',
        'for n in ("key", "query", "value")), "qkv")',
        ["tests/unit/test_hf_families.py", "tests/parity/test_roundtrip.py",
         "tests/parity/test_hf_parity.py"],
    ),
    "deberta-c2p": (
        "DeBERTa's content-to-position term (c2p: each query against its keys' relative "
        "positions) left out of the scores",
        "megarank/models/deberta.py",
        "bias = bias + c2p.gather(-1, index.expand(b, np_, s, s))",
        "pass",
        ["tests/integration/test_deberta.py", "tests/parity/test_hf_parity.py"],
    ),
    "deberta-pp-table-grads": (
        "DeBERTa's relative-table gradients summed over pipeline stages (each stage updates "
        "its copy from its own layers only)",
        "megarank/parallel/megatron.py",
        'if getattr(p, "pipeline_shared", False) and p.requires_grad:',
        "if False:",
        ["tests/distributed/test_layout_parity.py"],
    ),
}


def run(name: str) -> tuple[list[str], int, float]:
    what, path, old, new, tests = FEATURES[name]
    source = REPO / path
    text = source.read_text()
    assert text.count(old) == 1, f"{path}: the line to switch off is not there once: {old!r}"
    source.write_text(text.replace(old, new))
    start = time.perf_counter()
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p",
                               "no:cacheprovider", *tests], cwd=REPO, env=env,
                              capture_output=True, text=True)
    finally:
        source.write_text(text)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", proc.stdout, re.M)))
    errors = sorted(set(re.findall(r"^ERROR (\S+)", proc.stdout, re.M)))
    return failed + errors, proc.returncode, time.perf_counter() - start


def main(names: list[str]) -> None:
    rows = []
    for name in names or FEATURES:
        caught, rc, seconds = run(name)
        rows.append((name, caught, seconds))
        print(f"{name}: {len(caught)} failed ({seconds:.0f} s)", flush=True)
        for t in caught:
            print(f"  {t}", flush=True)
    print("\n| switched off | tests that failed |\n|---|---|")
    for name, caught, _ in rows:
        print(f"| {FEATURES[name][0]} | {'<br>'.join(caught) or '**none**'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
