"""The GPU benchmark must run as is on the next GPU lent: its --smoke mode runs the same code
path (model build, optimizer, synthetic batches, timing, FLOP accounting, the full-vocab head
variant) on a tiny model on the CPU and prints the table."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_gpu_decoder_benchmark_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_decoder.py", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| head | step s | pairs/s")
    heads = [r.split("|")[1].strip() for r in rows[1:]]
    assert heads == ["classifier", "yes_no", "full-vocab output layer"]
    for r in rows[1:]:
        assert float(r.split("|")[3]) > 0  # pairs/s
