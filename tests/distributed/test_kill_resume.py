"""kill -9 of the whole torchrun tree at random steps, five times, each followed by a resume:
every logged loss equals the uninterrupted run's to 1e-6, whether the kill landed mid-step or
mid-save (a ``.partial`` checkpoint is never taken for a complete one)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.runs import losses, read_metrics, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["model=gpt_tiny", "task=listwise", "task.group_size=4", "trainer.max_steps=24",
          "trainer.global_batch_size=4", "trainer.micro_batch_size=1", "trainer.log_interval=1",
          "trainer.save_interval=3", "trainer.eval_at_end=false", "trainer.progress_bar=false",
          "optim.lr=1e-3", "optim.warmup_steps=2", "model.hidden_dropout=0.1",
          "model.attention_dropout=0.1", "pair.max_length=64"]


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # the line being written
            steps.append(json.loads(line).get("step", 0))
    return max(steps, default=0)


def _start(run: Path, cwd: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "megarank.train", *COMMON, f"trainer.output_dir={run}", "trainer.resume=true"]
    log = open(run.parent / f"{run.name}.log", "ab")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=log,
                            start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to torchrun and every process under it at once (torchrun starts its workers in
    sessions of their own, so killing its process group would leave the ranks running)."""
    tree = psutil.Process(proc.pid)
    victims = [tree, *tree.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def test_kill_9_five_times_then_resume_reproduces_the_run(tmp_path):
    full = tmp_path / "full"
    run_train([*COMMON, f"trainer.output_dir={full}", "trainer.save_final=false"], nproc=2)
    reference = losses(full)
    assert sorted(reference) == list(range(1, 25))

    run = tmp_path / "killed"
    rng = random.Random(1)  # seeded: the kill steps are random but the same every run
    kills = []
    with tempfile.TemporaryDirectory(prefix="megarank-cwd-") as cwd:
        for _ in range(5):
            target = min(23, _logged_steps(run) + rng.randint(2, 5))
            proc = _start(run, cwd)
            deadline = time.monotonic() + 600
            while _logged_steps(run) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "the run stopped making progress"
                time.sleep(0.05)
            alive = proc.poll() is None
            _kill_tree(proc)
            assert alive, (run.parent / f"{run.name}.log").read_text()[-3000:]
            kills.append(_logged_steps(run))
        proc = _start(run, cwd)
        assert proc.wait(timeout=600) == 0
    assert len(kills) == 5 and kills == sorted(kills)
    # Kills between checkpoints (every 3 steps) mean steps were trained again after resuming.
    assert any(k % 3 for k in kills), kills
    # Every loss any attempt logged (steps after the last checkpoint are trained again, and
    # logged again) is the uninterrupted run's: sampler, Adam state, schedule and per-rank
    # dropout streams resumed.
    records = [r for r in read_metrics(run) if "loss" in r]
    assert {r["step"] for r in records} == set(range(1, 25))
    assert len(records) > 24
    for r in records:
        assert r["loss"] == pytest.approx(reference[r["step"]], abs=1e-6), r
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_0000024"
