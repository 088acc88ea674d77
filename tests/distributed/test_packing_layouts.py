"""data.packing under TP2, PP2 and DP2 (and MaxP): the packed runs' losses and gradient norms
equal the padded runs' in the same layout to 1e-5, for the encoder and the decoder. One torchrun
launch of two ranks runs every case (tests/distributed/packing_worker.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.runs import run_module

pytestmark = pytest.mark.distributed

COMMON = ["task=listwise", "task.group_size=4", "data=cranfield", "data.max_length=128",
          "data.max_query_length=16", "model.hidden_dropout=0", "model.attention_dropout=0",
          "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
          "trainer.log_interval=1", "trainer.save_final=false", "trainer.eval_at_end=false",
          "optim.warmup_steps=0"]
LAYOUTS = {"tp2": "parallel=tp2_pp1", "pp2": "parallel=tp1_pp2", "dp2": "parallel=tp1_pp1"}
CASES = [(model, layout, extra) for model in ("bert_tiny", "gpt_tiny") for layout in LAYOUTS
         for extra in ((),)] + [("gpt_tiny", "pp2", ("data.passages=max",
                                                      "data.train_passages=2"))]


def _name(model, layout, extra, packing):
    return f"{model}-{layout}-{'maxp-' if extra else ''}{'packed' if packing else 'padded'}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    cases = {}
    for model, layout, extra in CASES:
        for packing in (False, True):
            cases[_name(model, layout, extra, packing)] = [
                f"model={model}", LAYOUTS[layout], *COMMON, *extra,
                f"data.packing={str(packing).lower()}", "data.packed_multiple=8"]
    (tmp / "cases.json").write_text(json.dumps(cases))
    run_module("tests.distributed.packing_worker", [tmp / "cases.json", tmp / "out.json"],
               nproc=2, timeout=900)
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("model, layout, extra", CASES,
                         ids=[_name(*c, False).removesuffix("-padded") for c in CASES])
def test_packed_equals_padded_in_every_layout(runs, model, layout, extra):
    padded = runs[_name(model, layout, extra, False)]
    packed = runs[_name(model, layout, extra, True)]
    assert len(padded) == len(packed) == 2
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6)
        # the padding really went: packed rows are rounded up to 8 tokens only
        assert b["padding_fraction"] < min(a["padding_fraction"], 0.01)
