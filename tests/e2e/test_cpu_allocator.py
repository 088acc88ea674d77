"""``trainer.keep_freed_memory``: on the CPU a training step's tensors reuse the memory the
previous step freed, instead of being mapped, page-faulted and zeroed by the kernel afresh every
step. Measured by ``benchmarks/cpu_allocator.py`` (a worker process per setting, the setting being
the process's allocator's for good): minor page faults per MiniLM step with glibc's defaults,
then with the bundle's setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO


@pytest.mark.slow  # two fresh processes: megatron's import and a MiniLM build each, ~25 s
def test_a_cpu_step_reuses_freed_memory_instead_of_faulting_it_in():
    # Five rounds: the median stands when a round or two fault in more (on a busy machine one
    # of two rounds did, and the median of two is their mean).
    proc = subprocess.run(
        [sys.executable, "benchmarks/cpu_allocator.py", "--rows", "4", "--rounds", "5", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = {k: r["faults"] for k, r in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    # glibc's defaults: the step's large tensors (attention probabilities, MLP activations,
    # their gradients) are mapped afresh, thousands of 4 KiB pages (~5,000 at 4 rows; ~17,000
    # before the word embedding's gradient went straight into the buffer, which was 12,000 of
    # them: megarank.models.embedding_grad)
    assert faults["false"] > 2000, faults
    # kept: the step's memory comes back from the heap, next to no page is faulted in
    assert faults["true"] < faults["false"] / 20, faults
