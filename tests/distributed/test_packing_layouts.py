"""data.packing under TP2, PP2 and DP2 (and MaxP): the packed runs' losses and gradient norms
equal the padded runs' in the same layout to 1e-5, for the encoder and the decoder; so do packed
runs whose micro-batches are cut by tokens (data.tokens_per_micro_batch: fewer, unequal
micro-batches, a varying number under PP). One torchrun launch of two ranks runs every case
(tests.helpers.cases)."""

from __future__ import annotations

import pytest

from tests.helpers.cases import run_cases, train_case

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["task=listwise", "task.group_size=4", "data=cranfield", "pair.max_length=128",
          "pair.max_query_length=16", "model.hidden_dropout=0", "model.attention_dropout=0",
          "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
          "trainer.log_interval=1", "trainer.save_final=false", "trainer.eval_at_end=false",
          "optim.warmup_steps=0"]
LAYOUTS = {"tp2": "parallel=tp2_pp1", "pp2": "parallel=tp1_pp2", "dp2": "parallel=tp1_pp1"}
CASES = [(model, layout, extra) for model in ("bert_tiny", "gpt_tiny") for layout in LAYOUTS
         for extra in ((),)] + [("gpt_tiny", "pp2", ("data.passages=max",
                                                      "data.train_passages=2"))]


BUDGET = {False: 1536, True: 2560}
"""Tokens per micro-batch: three of Cranfield's groups at 128 tokens (~500 tokens each), so 4
groups a rank go in 2 micro-batches of 3 and 1 instead of 4 of 1; with MaxP (up to two windows
a document, up to ~1,000 tokens a group) two or so."""
VARIANTS = {"padded": ["data.packing=false"],
            "packed": ["data.packing=true", "data.packed_multiple=8"],
            "budget": ["data.packing=true", "data.packed_multiple=8"]}


def _name(model, layout, extra, variant):
    return f"{model}-{layout}-{'maxp-' if extra else ''}{variant}"


@pytest.fixture(scope="module")
def runs():
    cases = {}
    for model, layout, extra in CASES:
        for variant, overrides in VARIANTS.items():
            cases[_name(model, layout, extra, variant)] = train_case([
                f"model={model}", LAYOUTS[layout], *COMMON, *extra, *overrides,
                *([f"data.tokens_per_micro_batch={BUDGET[bool(extra)]}"]
                  if variant == "budget" else [])])
    return run_cases(cases, nproc=2, timeout=900)


@pytest.mark.parametrize("model, layout, extra", CASES,
                         ids=[_name(*c, "").removesuffix("-") for c in CASES])
@pytest.mark.parametrize("variant", ["packed", "budget"])
def test_packed_equals_padded_in_every_layout(runs, model, layout, extra, variant):
    padded = runs[_name(model, layout, extra, "padded")]
    packed = runs[_name(model, layout, extra, variant)]
    assert len(padded) == len(packed) == 2
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6)
        # the padding really went: packed rows are rounded up to 8 tokens only
        assert b["padding_fraction"] < min(a["padding_fraction"], 0.01)
        if variant == "budget":  # the budget really cut: fewer micro-batches than groups
            assert b["micro_batches"] < a["micro_batches"]
