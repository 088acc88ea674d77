"""Start ``megarank serve`` as a real process and talk to it; the pairs the serving tests use."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megarank.data.beir import candidates, load_collection, read_trec_run
from tests.helpers.runs import data_dir, run_module

URL = re.compile(r"megarank serve: .* listening on (http://\S+)")


class ServerProcess:
    """``megarank serve --model MODEL ARGS`` (through the ``megarank`` command dispatcher) in
    ``cwd``, with its stderr collected; :meth:`start` returns once it listens."""

    def __init__(self, model: Path, cwd: Path, args: list[str] = (), threads: int = 2) -> None:
        self.cmd = [sys.executable, "-c", "from megarank.cli import main; main()", "serve",
                    "--model", str(model), "--port", "0", "--threads", str(threads),
                    *map(str, args)]
        self.cwd = cwd
        self.lines: list[str] = []
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> ServerProcess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        listening = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = URL.search(line)
                if m:
                    self.url = m.group(1)
                    listening.set()
            listening.set()  # the process ended

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(timeout) or self.url is None:
            self.stop()
            raise AssertionError(f"the server did not start:\n{self.output[-6000:]}")
        return self

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def run_failing_server(model: Path, cwd: Path, args: list[str] = ()) -> subprocess.CompletedProcess:
    """``megarank serve`` that is expected to stop at start: its status and output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", "from megarank.cli import main; main()",
                           "serve", "--model", str(model), "--port", "0", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def cranfield_requests(n: int, max_docs: int, words: int = 40) -> list[tuple[str, list[str]]]:
    """``n`` (query, documents) requests from Cranfield's test queries and their BM25 top
    documents (the first ``words`` words of each, so that the tests stay quick), with
    document counts from 1 to ``max_docs``."""
    root = data_dir("cranfield")
    coll = load_collection(root)
    qids = coll.split_qids("test")[:n]
    assert len(qids) == n
    cands = candidates(read_trec_run(root / "run.bm25.trec"), qids, max_docs)
    out = []
    for i, q in enumerate(qids):
        count = 1 + (i * 7) % max_docs
        docs = [" ".join(coll.corpus[d].split()[:words]) for d in cands[q][:count]]
        out.append((coll.queries[q], docs))
    return out


def megarank_scores(model: Path, pairs: list[tuple[str, str]], workdir: Path) -> list[float]:
    """``megarank score`` on ``pairs``."""
    workdir.mkdir(parents=True, exist_ok=True)
    src, out = workdir / "pairs.jsonl", workdir / "scores.jsonl"
    src.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    run_module("megarank.score", ["--model", model, "--pairs", src, "--out", out])
    return [json.loads(line)["score"] for line in out.read_text().splitlines()]


def wait_for(predicate, timeout: float = 60, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
