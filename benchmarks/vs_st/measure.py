"""Running training commands as measured child processes: the time each one ran, its peak
memory, when each of its steps ended, and how busy other processes kept the machine meanwhile.

Several commands can be measured *interleaved*: they are started and stopped in turns of a few
seconds (SIGSTOP / SIGCONT to the whole process tree), so that only one runs at a time and each
gets the machine in many short slices spread over the same minutes. A shared machine's speed
drifts by 20% over minutes (the same deterministic run, measured twice in a row, differed by
23%); run one after the other, two systems see different machines, interleaved they see the
same one. Every time below is *active* time: the seconds the command was running, its stopped
slices left out.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, idle and iowait excluded)."""
    t = psutil.cpu_times()
    # guest time is already counted in user time.
    skip = {"idle", "iowait", "guest", "guest_nice"}
    return sum(v for k, v in t._asdict().items() if k not in skip)


@dataclass
class Job:
    """A command to measure. ``watch``: a file the command appends one line to per step
    (megarank's metrics.jsonl); the time each new line is seen is recorded with it."""

    cmd: list[str]
    env: dict[str, str]
    log: Path
    watch: Path | None = None


@dataclass
class _Run:
    """A started job: its process, the spans it ran in, and what sampling saw."""

    job: Job
    proc: subprocess.Popen
    out: object
    spans: list[list[float]] = field(default_factory=list)  # [start, end] perf_counter times
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> last user + system seconds
    peak_tree: int = 0
    peak_top: int = 0
    lines: list[tuple[float, str]] = field(default_factory=list)  # (time seen, watched line)
    _offset: int = 0
    _partial: str = ""

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def sample(self, now: float) -> None:
        """Memory and CPU time of the tree, and new lines of the watched file."""
        try:
            root = psutil.Process(self.proc.pid)
            top = {p.pid for p in root.children()} | {root.pid}
            rss_tree = rss_top = 0
            for p in self.tree():
                rss = p.memory_info().rss
                rss_tree += rss
                rss_top += rss if p.pid in top else 0
                times = p.cpu_times()
                self.cpu[p.pid] = times.user + times.system
            self.peak_tree, self.peak_top = max(self.peak_tree, rss_tree), max(self.peak_top,
                                                                               rss_top)
        except psutil.Error:  # a process ended between listing and reading
            pass
        watch = self.job.watch
        if watch is not None and watch.exists():
            with watch.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            self._offset += len(chunk)
            *done, self._partial = (self._partial + chunk.decode()).split("\n")
            self.lines += [(now, line) for line in done if line]

    def signal_tree(self, sig: signal.Signals) -> None:
        """``sig`` to every process of the tree; listed again after, for a child forked while
        the signal went out."""
        seen: set[int] = set()
        for _ in range(2):
            try:
                procs = self.tree()
            except psutil.Error:
                return
            for p in procs:
                if p.pid not in seen:
                    seen.add(p.pid)
                    try:
                        p.send_signal(sig)
                    except psutil.Error:
                        pass

    def active(self, t: float) -> float:
        """Seconds this job had run by perf_counter time ``t``."""
        return sum(max(0.0, min(end, t) - start) for start, end in self.spans)


def run_interleaved(jobs: dict[str, Job], slice_s: float) -> dict[str, dict]:
    """Run ``jobs`` in turns of ``slice_s`` seconds each, one at a time (``slice_s`` 0: each to
    its end, in order); a job starts at its first turn. Per job: its active seconds, peak
    memory, the watched lines and the active time each appeared at (``lines``,
    ``line_times``), ``active``: perf_counter time -> the job's active seconds by then,
    ``spans``: the (start, end) perf_counter times it ran in, and the
    cores OTHER processes kept busy over the whole measurement (a 2-core machine shared with
    other work makes the throughput meaningless: rerun when other_cores is near 0).

    Memory is the peak over time of the summed RSS of (a) the whole process tree and (b) the
    command and its direct children only (torchrun's launcher and ranks). They differ when a
    rank forks: megatron's checkpoint writer forks helper processes whose RSS is mostly pages
    shared copy-on-write with their rank, so (a) counts the rank's memory again per helper.
    """
    t0, busy0 = time.perf_counter(), _busy_seconds()
    names, runs = list(jobs), {}
    current: str | None = None
    try:
        while True:
            now = time.perf_counter()
            finished = over = False
            if current is not None:
                run = runs[current]
                finished = run.proc.poll() is not None
                if finished:
                    run.spans[-1][1] = now
                    run.sample(now)
                    if run.proc.returncode:
                        tail = run.job.log.read_text(errors="replace")[-4000:]
                        raise SystemExit(f"{' '.join(run.job.cmd)}\nfailed (exit "
                                         f"{run.proc.returncode}); end of {run.job.log}:\n{tail}")
                over = finished or bool(slice_s) and now - run.spans[-1][0] >= slice_s
            if current is None or over:
                nxt = _next_turn(names, runs, current)
                if nxt is None:
                    break
                if nxt != current:
                    if current is not None and not finished:
                        runs[current].signal_tree(signal.SIGSTOP)
                        runs[current].spans[-1][1] = time.perf_counter()
                    start = time.perf_counter()  # before the signal: it runs on receipt
                    if nxt in runs:
                        runs[nxt].signal_tree(signal.SIGCONT)
                    else:
                        job = jobs[nxt]
                        out = job.log.open("w")
                        runs[nxt] = _Run(job, subprocess.Popen(
                            job.cmd, cwd=REPO, env=job.env, stdout=out,
                            stderr=subprocess.STDOUT), out)
                    runs[nxt].spans.append([start, start])
                    current = nxt
            for run in runs.values():
                if run.proc.poll() is None:
                    run.sample(now)
            time.sleep(0.05)
    finally:
        for run in runs.values():
            if run.proc.poll() is None:  # a failure elsewhere: nothing is left running
                run.signal_tree(signal.SIGCONT)
                run.signal_tree(signal.SIGKILL)
                run.proc.wait()
            run.out.close()
    seconds = time.perf_counter() - t0
    own = sum(sum(r.cpu.values()) for r in runs.values())
    others = max(0.0, _busy_seconds() - busy0 - own) / seconds
    return {name: {"seconds": r.active(float("inf")), "peak_rss_gib": r.peak_tree / 2**30,
                   "peak_rss_top_gib": r.peak_top / 2**30, "other_cores": others,
                   "line_times": [r.active(t) for t, _ in r.lines],
                   "lines": [line for _, line in r.lines], "active": r.active,
                   "spans": [tuple(span) for span in r.spans]}
            for name, r in runs.items()}


def _next_turn(names: list[str], runs: dict[str, _Run], current: str | None) -> str | None:
    """The job whose turn follows ``current``'s: the next in ``names``, cyclically, that has
    not finished (``current`` itself when it is the only one left); None when all have."""
    first = names.index(current) + 1 if current is not None else 0
    for k in range(len(names)):
        name = names[(first + k) % len(names)]
        if name not in runs or runs[name].proc.poll() is None:
            return name
    return None


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured process: ``threads`` intra-op threads, quiet tokenizers,
    megarank and these benchmarks importable."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    paths = (str(REPO), str(REPO / "benchmarks"), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def step_rates(ends: dict[int, float], per_step: int) -> dict[int, float]:
    """Step -> pairs/s, from step -> the active time it ended at (step 0: training began)."""
    return {s: per_step / (t - ends[s - 1]) for s, t in ends.items()
            if s - 1 in ends and t > ends[s - 1]}


def steady(rates: dict[int, float], steps: int) -> float:
    """Median per-step rate over the second half of the steps (start-up and warm-up excluded)."""
    late = [r for s, r in rates.items() if s > steps // 2]
    return statistics.median(late) if late else float("nan")
