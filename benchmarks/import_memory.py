"""What each rank reads, and holds, when an HF model is imported under tensor parallelism.

    python benchmarks/import_memory.py [--layers 20] [--workdir /tmp/megarank-import-bench]

Writes the random ~1B Llama-architecture model of convert_1b.py (fp32, sharded safetensors), then
imports it under torchrun at tp1 (1 rank) and tp2 (2 ranks). Each rank builds its stage, then
loads the HF weights into it while a thread samples its own PSS, and reports: the tensor bytes
it read from the safetensors files (``HFWeights.bytes_read``: only its slices of sharded
tensors, via ``get_slice``), its parameter bytes, its PSS before the load and the peak during
it. One table is printed. No test asserts these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def worker(hf_dir: str, tp: int, out: str) -> None:
    """One rank under torchrun: build the stage, load the HF weights, write this rank's record."""
    import psutil

    from megarank.bundle import build_bundle
    from megarank.checkpoint.hf import HFWeights, load_hf_weights
    from megarank.config import compose, padded_vocab_size

    cfg = compose(["model=hf", f"model.hf_path={hf_dir}", f"parallel=tp{tp}_pp1",
                   "trainer.device=cpu"])
    me = psutil.Process()
    with build_bundle(cfg, device="cpu", load_hf=False) as bundle:
        runtime, m = bundle.runtime, bundle.cfg.model
        module = bundle.model.module
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        before = me.memory_full_info().pss
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], me.memory_full_info().pss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        weights = HFWeights(hf_dir)
        t0 = time.perf_counter()
        load_hf_weights(module, hf_dir, bundle.cfg, runtime.tp_rank, runtime.tp_size, runtime.pp_rank,
                        runtime.pp_size, padded_vocab_size(m),
                        weights=weights)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        peak[0] = max(peak[0], me.memory_full_info().pss)
        record = {"tp": tp, "rank": runtime.rank, "bytes_read": weights.bytes_read,
                  "param_bytes": params, "pss_before": before, "pss_peak": peak[0],
                  "seconds": seconds}
    Path(f"{out}.rank{record['rank']}.json").write_text(json.dumps(record))


def run(hf_dir: Path, tp: int, out: Path) -> list[dict]:
    """torchrun the worker with tp ranks; their records."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={tp}", str(Path(__file__).resolve()), "--worker", str(hf_dir),
           str(tp), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(tp)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/megarank-import-bench")
    ap.add_argument("--worker", nargs=3, metavar=("HF_DIR", "TP", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        hf_dir, tp, out = args.worker
        worker(hf_dir, int(tp), out)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_1b import write_random_llama

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    params = write_random_llama(work / "hf", args.layers)
    size = params * 4
    print(f"random Llama: {params / 1e9:.2f}B parameters, {size / GIB:.2f} GiB fp32")
    print("\n| layout | rank | read GiB | read / model | params GiB | PSS before load GiB | "
          "peak PSS in load GiB | load growth GiB | load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tp in (1, 2):
        for r in run(work / "hf", tp, work / f"tp{tp}"):
            print(f"| tp{tp}_pp1 | {r['rank']} | {r['bytes_read'] / GIB:.2f} | "
                  f"{r['bytes_read'] / size:.2f} | {r['param_bytes'] / GIB:.2f} | "
                  f"{r['pss_before'] / GIB:.2f} | {r['pss_peak'] / GIB:.2f} | "
                  f"{(r['pss_peak'] - r['pss_before']) / GIB:.2f} | {r['seconds']:.1f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
