"""``trainer.keep_freed_memory``: on the CPU a training step's tensors reuse the memory the
previous step freed, instead of being mapped, page-faulted and zeroed by the kernel afresh every
step. Measured in a fresh process (the setting is the process's allocator's, for good): minor
page faults per MiniLM step with glibc's defaults, then with the bundle's setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO

_STEPS = """
import json, resource, statistics, torch
from megarank.bundle import build_bundle
from megarank.config import compose

torch.set_num_threads(1)
faults = {}
for keep in ("false", "true"):
    cfg = compose(["model=minilm", "pair.max_length=128", "trainer.device=cpu",
                   f"trainer.keep_freed_memory={keep}"])
    with build_bundle(cfg, load_hf=False, device="cpu") as bundle:
        model = bundle.model
        model.train()
        ids = torch.randint(1000, 20000, (4, 128), generator=torch.Generator().manual_seed(0))
        batch = (ids, torch.ones_like(ids), torch.zeros_like(ids), torch.zeros(4, dtype=torch.long))
        per_step = []
        for step in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model.zero_grad_buffer()
            model(*batch).float().sum().backward()
            per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        faults[keep] = statistics.median(per_step[2:])  # after two warm-up steps
print(json.dumps(faults))
"""


@pytest.mark.slow  # a fresh process: megatron's import and two MiniLM builds, ~25 s
def test_a_cpu_step_reuses_freed_memory_instead_of_faulting_it_in():
    proc = subprocess.run([sys.executable, "-c", _STEPS], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = json.loads(proc.stdout.strip().splitlines()[-1])
    # glibc's defaults: the step's large tensors are mapped afresh (tens of MB of 4 KiB pages)
    assert faults["false"] > 5000, faults
    # kept: the step's memory comes back from the heap, next to no page is faulted in
    assert faults["true"] < faults["false"] / 20, faults
