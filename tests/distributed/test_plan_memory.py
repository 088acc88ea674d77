"""`megarank plan --measure` on two gloo ranks: every rank's planned bytes against the tensors
of its own stage after one training step, for tensor, pipeline and data parallelism (ZeRO-1).

Weights, gradients and optimizer state must match to the byte; activations within 15% (the
pipeline schedule's peak, with 2 micro-batches in flight on the first stage of 2). The layouts
are the cases of one 2-rank launch.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cases import cli_case, run_cases
from tests.helpers.parity_capture import read_stdout

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SHAPE = ["task.group_size=8", "trainer.micro_batch_size=2", "pair.max_length=128",
         "trainer.device=cpu"]
LAYOUTS = {
    "tp2": ["model=gpt_tiny", "parallel=tp2_pp1", "trainer.global_batch_size=4"],
    "pp2-bert": ["model=bert_tiny", "parallel=tp1_pp2", "trainer.global_batch_size=6"],
    "pp2-full-recompute": ["model=gpt_tiny", "parallel=tp1_pp2", "trainer.global_batch_size=6",
                           "trainer.recompute=full"],
    "dp2-bf16-zero1": ["model=gpt_tiny", "trainer.precision=bf16",
                       "parallel.use_distributed_optimizer=true", "trainer.global_batch_size=4"],
}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """layout -> (what the ranks printed, the --json record)."""
    root = tmp_path_factory.mktemp("plan")
    run_cases({layout: cli_case("tests.helpers.parity_capture", [
        root / f"{layout}.stdout", "megarank.plan", "--measure", "--json",
        root / f"{layout}.json", *SHAPE, *LAYOUTS[layout]]) for layout in sorted(LAYOUTS)},
        nproc=2)
    return {layout: (read_stdout(root / f"{layout}.stdout", 2),
                     json.loads((root / f"{layout}.json").read_text())) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_matches_every_rank(layout, plans):
    stdout, record = plans[layout]
    assert "measured on this machine" in stdout, stdout[-2000:]
    plan, measured = record["plan"], record["measured"]
    assert plan["world_size"] == 2 and len(measured) == 2
    mode, zero1 = plan["recompute"], plan["distributed_optimizer"]
    for rank, m in enumerate(measured):
        s = plan["stages"][m["stage"]]
        assert (s["params"], s["weights"], s["grads"]) == (m["params"], m["weights"],
                                                           m["grads"]), (layout, rank)
        assert m["optimizer"] == (s["optim_distributed"] if zero1 else s["optim_plain"])
        peak = (s["in_flight"] * s["saved_per_micro_batch"][mode] + s["working_set"][mode])
        assert m["peak"] == pytest.approx(peak, rel=0.15), (layout, rank, m["peak"], peak)
        if m["saved"] is not None:
            assert m["saved"] == pytest.approx(s["saved_per_micro_batch"][mode], rel=0.02)
    stages = sorted(m["stage"] for m in measured)
    if layout.startswith("pp2"):
        assert stages == [0, 1]
        first = next(m for m in measured if m["stage"] == 0)
        one = plan["stages"][0]["saved_per_micro_batch"][mode]
        # 1F1B keeps two micro-batches in flight on the first stage: the feature the plan models
        assert first["peak"] > 1.5 * one
    if layout == "tp2":
        # each TP rank holds half of every split weight
        full = plan["total_params"]
        assert 0.45 * full < measured[0]["params"] < 0.55 * full
    if layout == "dp2-bf16-zero1":
        s = plan["stages"][0]
        assert s["optim_distributed"] * 2 == s["optim_plain"]  # 12 bytes/param over 2 ranks
        assert (s["weights"] + s["grads"] + s["optim_distributed"]) / s["params"] == 6 + 12 / 2
