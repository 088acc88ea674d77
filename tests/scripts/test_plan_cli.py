"""`megarank plan` on the command line: the table, the JSON record (the library's plan, field
for field), the fit line, and its refusals (``megarank.cli.main`` in this process)."""

from __future__ import annotations

import dataclasses
import json
import subprocess

from megarank.config import compose
from megarank.training.sizing import plan_memory
from tests.helpers.runs import run_cli

ARGS = ["model=qwen2_7b", "parallel=tp4_pp2", "trainer.precision=bf16",
        "trainer.global_batch_size=32", "trainer.micro_batch_size=1", "pair.max_length=512"]


def _plan(*args: str) -> subprocess.CompletedProcess:
    return run_cli("megarank.cli", ["plan", *args], check=False)


def test_table_and_json_are_the_librarys_plan(tmp_path):
    out = tmp_path / "plan.json"
    # options may follow the overrides
    proc = _plan(*ARGS, "--world-size", "32", "--gpu", "A100-40GB", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "32 GPUs = TP 4 x PP 2 x DP 4" in text
    assert "stage 0 (14 layers)" in text and "stage 1 (14 layers)" in text
    assert "optimizer, distributed (/4)" in text and "GPU A100-40GB: 40 GiB" in text
    record = json.loads(out.read_text())
    want = dataclasses.asdict(plan_memory(compose(ARGS), 32))
    assert record["plan"] == json.loads(json.dumps(want))
    assert record["fit"]["fits"] == (record["fit"]["needed"] <= record["fit"]["usable"])
    assert record["total_per_gpu"] == record["fit"]["needed"]


def test_a_layout_that_does_not_fit_warns_and_strict_fails():
    proc = _plan(*ARGS, "trainer.micro_batch_size=8", "trainer.global_batch_size=64",
                 "parallel=tp1_pp1", "--world-size", "8", "--gpu", "H100-80GB", "--strict")
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout
    assert "WARNING: megarank plan: stage 0 needs" in proc.stderr


def test_refusals_name_the_problem():
    proc = _plan(*ARGS, "--world-size", "12")
    assert proc.returncode == 1 and "world size (12) must be divisible" in proc.stderr
    proc = _plan(*ARGS, "--gpu", "Z100")
    assert proc.returncode == 1 and "unknown GPU 'Z100'" in proc.stderr
