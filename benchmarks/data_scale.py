"""Training data at scale: a prepared (tokenized, memory-mapped) dataset against the JSONL path.

    python benchmarks/data_scale.py [--sizes 10000,100000,1000000] [--jsonl-max 1000000]
        [--corpus 50000] [--steps 6] [--repeats 2] [--workdir DIR] [--smoke]

Writes synthetic FlagEmbedding triplets: each group a distinct query of 8 words, 1 positive and
15 negatives drawn from a shared corpus of ``--corpus`` documents of 60 words (words from the
shipped Cranfield corpus), with teacher scores, as mined hard negatives share one corpus. The
smaller files are the first lines of the largest. For each size:

- ``megarank prepare`` (gpt_tiny's tokenizer, pair.max_length=128) in its own process: time,
  documents (positives + negatives read) per second, size on disk, peak memory;
- training from the prepared directory and, up to ``--jsonl-max`` groups, from the JSONL (which
  training prepares in memory at start-up): one process (one rank), gpt_tiny, 16 documents a
  group, 8 groups a step, ``--steps`` steps; start-up = launch to the end of step 1; peak
  private memory (RssAnon, sampled every 20 ms: what the rank holds of its own) and peak RSS
  (ru_maxrss: that plus the mapped file pages it touched, page cache that every rank on a node
  shares and the kernel can drop); the mean ``data_wait_s`` of steps 2.. with the background
  prefetch on (the default) and off (``data.prefetch_steps=0``, prepared rows).

Training figures are the lowest over ``--repeats`` runs (one for JSONL at 1M groups). One
table, ratios against the smallest prepared size in the same run. Nothing asserts these
numbers; ``--smoke`` runs the whole path at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = ["model=gpt_tiny", "pair.max_length=128"]
TRAIN = ["data=cranfield", "task=listwise", "task.group_size=16", "trainer.micro_batch_size=2",
         "trainer.global_batch_size=8", "trainer.log_interval=1", "trainer.eval_at_end=false",
         "trainer.save_final=false", "trainer.progress_bar=false", "optim.warmup_steps=1"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _anon_mb() -> float:
    """This process's anonymous (private, not file-backed) resident memory now, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sample_anon(peak: list[float], done: threading.Event) -> None:
    while not done.is_set():
        peak[0] = max(peak[0], _anon_mb())
        time.sleep(0.02)


def train_worker(launched: float, overrides: list[str]) -> None:
    """One training run in this process; prints a JSON line: start-up, peak memory, waits."""
    import megarank.training.loop as loop
    from megarank.api import train_model

    ends: list[float] = []
    step = loop.train_step

    def timed(*args, **kwargs):  # the end of every step, for the start-up figure
        out = step(*args, **kwargs)
        ends.append(time.time())
        return out

    loop.train_step = timed
    peak, done = [_anon_mb()], threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=(peak, done), daemon=True)
    sampler.start()
    train_model(overrides)
    done.set()
    sampler.join()
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir="))
    waits = [json.loads(line).get("data_wait_s") for line in
             Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    waits = [w for w in waits if w is not None]
    print(json.dumps({"startup_s": ends[0] - launched, "peak_mb": _peak_mb(), "anon_mb": peak[0],
                      "wait_s": float(np.mean(waits[1:])) if len(waits) > 1 else waits[0],
                      "step_s": float(np.mean(np.diff(ends))) if len(ends) > 1 else None}))


def prepare_worker(out: str, inputs: list[str]) -> None:
    """`megarank prepare` in this process; prints a JSON line with its stats and peak memory."""
    from megarank.api import prepare_data

    stats = prepare_data(inputs, out, MODEL, progress=False)
    print(json.dumps({**stats.__dict__, "peak_mb": _peak_mb()}))


def _run(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, *args[:1], str(launched), *args[1:]],
                          capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - launched
    return out


def _best(runs: list[dict]) -> dict:
    """The lowest of each figure over repeated runs: on a shared machine the other jobs only
    ever add time (and the memory figures barely move between repeats)."""
    return {k: min(r[k] for r in runs) if runs[0][k] is not None else None for k in runs[0]}


def write_triplets(path: Path, groups: int, corpus_size: int, seed: int = 0) -> None:
    """`groups` synthetic triplet lines over a shared corpus (see the module docstring)."""
    words = sorted({w for line in open(REPO / "megarank/assets/collections/cranfield/corpus.jsonl")
                    for w in json.loads(line)["text"].split() if w.isalpha()})
    rng = np.random.default_rng(seed)
    vocab = np.array(words)
    corpus = [json.dumps(" ".join(vocab[rng.integers(len(vocab), size=60)]))
              for _ in range(corpus_size)]
    chunk = 10_000
    with open(path, "w") as f:
        for start in range(0, groups, chunk):
            n = min(chunk, groups - start)
            qwords = vocab[rng.integers(len(vocab), size=(n, 8))]
            docs = rng.integers(corpus_size, size=(n, 16))
            scores = np.round(rng.normal(size=(n, 16)), 4)
            lines = []
            for i in range(n):
                d, s = docs[i], scores[i].tolist()
                lines.append(
                    f'{{"query": "q{start + i} {" ".join(qwords[i])}", "pos": [{corpus[d[0]]}], '
                    f'"neg": [{", ".join(corpus[j] for j in d[1:])}], '
                    f'"pos_scores": [{s[0]}], "neg_scores": {s[1:]}}}\n')
            f.write("".join(lines))


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None,
                    help="groups per row, comma-separated (default 10000,100000,1000000; "
                         "--smoke: 200,2000)")
    ap.add_argument("--jsonl-max", type=int, default=1_000_000,
                    help="largest size also trained from JSONL (its start-up prepares in memory)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="training runs per row, the lowest figures kept (JSONL at 1M: one)")
    ap.add_argument("--corpus", type=int, default=50_000, help="distinct documents")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed")
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes (200,2000 groups unless --sizes), a 500-document corpus; "
                         "no uncounted warm-up run")
    args = ap.parse_args()
    default = "200,2000" if args.smoke else "10000,100000,1000000"
    sizes = [int(s) for s in (args.sizes or default).split(",")]
    corpus = 500 if args.smoke else args.corpus
    work = Path(args.workdir or tempfile.mkdtemp(prefix="megarank-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        biggest = work / f"triplets_{max(sizes)}.jsonl"
        write_triplets(biggest, max(sizes), corpus)
        gen_s = time.perf_counter() - t0
        for n in sizes:
            path = work / f"triplets_{n}.jsonl"
            if path != biggest:
                with open(biggest) as src, open(path, "w") as dst:
                    for _, line in zip(range(n), src, strict=False):
                        dst.write(line)
        rows = []
        train = [*MODEL, *TRAIN, f"trainer.max_steps={args.steps}"]
        # One run first, not counted: the first process after a while reads its libraries from
        # disk, which would charge the smallest size with seconds of start-up. (--smoke checks
        # the script, not its figures: no warm-up run there.)
        if not args.smoke:
            _run(["--train-worker", *train,
                  f"data.train_path={work / f'triplets_{sizes[0]}.jsonl'}",
                  f"trainer.output_dir={work / 'warm-up'}", "trainer.max_steps=2"], work)
        for n in sizes:
            jsonl, prep = work / f"triplets_{n}.jsonl", work / f"prepared_{n}"
            p = _run(["--prepare-worker", str(prep), str(jsonl)], work)
            r = _best([_run(["--train-worker", *train, f"data.train_path={prep}",
                             f"trainer.output_dir={work / f'run_p{n}_{k}'}"], work)
                       for k in range(args.repeats)])
            r0 = _run(["--train-worker", *train, f"data.train_path={prep}",
                       "data.prefetch_steps=0", f"trainer.output_dir={work / f'run_p0{n}'}"], work)
            rows.append({"groups": n, "path": "prepared", "prepare_s": p["seconds"],
                         "docs_per_s": p["documents_read"] / p["seconds"],
                         "distinct_docs": p["distinct_documents"], "prepare_peak_mb": p["peak_mb"],
                         "disk_mb": _size(prep) / 1e6, **r, "wait_off_s": r0["wait_s"]})
            if n <= args.jsonl_max:
                j = _best([_run(["--train-worker", *train, f"data.train_path={jsonl}",
                                 f"trainer.output_dir={work / f'run_j{n}_{k}'}"], work)
                           for k in range(args.repeats if n < 1_000_000 else 1)])
                rows.append({"groups": n, "path": "JSONL", "disk_mb": _size(jsonl) / 1e6, **j})
            shutil.rmtree(prep)
        ref = rows[0]
        print(f"synthetic triplets written in {gen_s:.0f} s; corpus {corpus:,} documents; "
              f"gpt_tiny, 16 documents a group, 8 groups a step, one rank\n")
        print("| groups | data | prepare s | docs/s | size on disk MB | start-up s | x ref | "
              "peak private MB | x ref | peak RSS MB | data wait / step ms (prefetch on / off) "
              "| step s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            prep_cols = (f"{r['prepare_s']:.1f} | {r['docs_per_s']:,.0f}"
                         if r["path"] == "prepared" else "- | -")
            wait = f"{r['wait_s'] * 1e3:.2f}" + (
                f" / {r['wait_off_s'] * 1e3:.2f}" if "wait_off_s" in r else "")
            print(f"| {r['groups']:,} | {r['path']} | {prep_cols} | {r['disk_mb']:,.1f} | "
                  f"{r['startup_s']:.1f} | {r['startup_s'] / ref['startup_s']:.2f} | "
                  f"{r['anon_mb']:,.0f} | {r['anon_mb'] / ref['anon_mb']:.2f} | "
                  f"{r['peak_mb']:,.0f} | {wait} | "
                  f"{r['step_s']:.3f} |")
        print("\nprepare peak memory MB: " + ", ".join(
            f"{r['groups']:,}: {r['prepare_peak_mb']:,.0f}" for r in rows if r["path"] == "prepared"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--train-worker":
        train_worker(float(sys.argv[2]), sys.argv[3:])
    elif len(sys.argv) > 2 and sys.argv[1] == "--prepare-worker":
        prepare_worker(sys.argv[3], sys.argv[4:])
    else:
        main()
