"""A job told to stop (SIGUSR1 from Slurm's --signal, or SIGTERM on preemption) saves a complete
checkpoint at the next step boundary and exits cleanly; resume continues from it.

The stopped run is ``python -m megarank.train`` in a process of its own (the signal goes to
it); the resumed run trains in this process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import megarank
from tests.helpers.runs import REPO


def test_sigusr1_saves_and_exits(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megarank.train", "model=gpt_tiny", "trainer.max_steps=100000",
         "trainer.log_interval=1", "trainer.eval_at_end=false", "trainer.progress_bar=false",
         "pair.max_length=64", f"trainer.output_dir={out}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (SIGUSR1)" in err
    latest = (out / "checkpoints" / "latest").read_text()
    step = json.loads((out / "checkpoints" / latest / "megarank.json").read_text())["step"]
    assert 3 <= step < 100000
    assert not list((out / "checkpoints").glob("*.partial"))

    megarank.train_model(["model=gpt_tiny", f"trainer.max_steps={step + 2}",
                          "trainer.log_interval=1", "trainer.eval_at_end=false",
                          "trainer.progress_bar=false", "pair.max_length=64",
                          "trainer.resume=true", f"trainer.output_dir={out}"])
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps[-2:] == [step + 1, step + 2]
