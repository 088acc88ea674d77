"""Running a training command as a measured child process: wall time, peak memory, and how busy
other processes kept the machine meanwhile."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, idle and iowait excluded)."""
    t = psutil.cpu_times()
    # guest time is already counted in user time.
    skip = {"idle", "iowait", "guest", "guest_nice"}
    return sum(v for k, v in t._asdict().items() if k not in skip)


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd`` (output to ``log``); return its wall seconds, peak memory and the cores that
    OTHER processes kept busy meanwhile (a 2-core machine shared with other work makes the
    throughput meaningless: rerun when other_cores is near 0).

    Memory is the peak over time of the summed RSS of (a) the whole process tree and (b) the
    command and its direct children only (torchrun's launcher and ranks). They differ when a
    rank forks: megatron's checkpoint writer forks helper processes whose RSS is mostly pages
    shared copy-on-write with their rank, so (a) counts the rank's memory again per helper.
    """
    t0, busy0 = time.perf_counter(), _busy_seconds()
    cpu: dict[int, float] = {}  # pid -> last seen user + system seconds
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        root, peak_tree, peak_top = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                top = {p.pid for p in root.children()} | {root.pid}
                rss_tree = rss_top = 0
                for p in [root, *root.children(recursive=True)]:
                    rss = p.memory_info().rss
                    rss_tree += rss
                    rss_top += rss if p.pid in top else 0
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
                peak_tree, peak_top = max(peak_tree, rss_tree), max(peak_top, rss_top)
            except psutil.Error:  # a process ended between listing and reading
                pass
            time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(cmd)}\nfailed (exit {proc.returncode}); end of {log}:\n{tail}")
    others = max(0.0, _busy_seconds() - busy0 - sum(cpu.values())) / seconds
    return {"seconds": seconds, "peak_rss_gib": peak_tree / 2**30,
            "peak_rss_top_gib": peak_top / 2**30, "other_cores": others}


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured process: ``threads`` intra-op threads, quiet tokenizers,
    megarank and these benchmarks importable."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    paths = (str(REPO), str(REPO / "benchmarks"), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def steady(rates: dict[int, float], steps: int) -> float:
    """Median per-step rate over the second half of the steps (start-up and warm-up excluded)."""
    late = [r for s, r in rates.items() if s > steps // 2]
    return statistics.median(late) if late else float("nan")
