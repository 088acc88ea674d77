"""LoRA under every layout: from the same base and adapters, 5 steps of losses (and gradient
norms) under tp2, pp2 and dp2 (also with the distributed optimizer) equal one process's, for a
decoder and two encoders (BERT; DeBERTa, whose adapted QKV also projects its position table);
DoRA likewise under tp2 (the row-parallel norm reduced over the TP group), pp2 and dp2 with the
distributed optimizer; a bf16 run with full recompute follows the fp32 one; and a LoRA run
resumed after 10 steps equals 20 straight steps, with checkpoints that hold only adapters, head
and optimizer state, the base being referenced.

The bases and the single-process references are trained in this process; every two-rank run
(the layouts, bf16, the resume's three runs) is a case of ONE torchrun launch."""

from __future__ import annotations

import json

import pytest

import megarank
from megarank.checkpoint.stream import CheckpointTensors
from tests.helpers.cases import cli_case, run_cases, train_case
from tests.helpers.runs import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = [  # (name, overrides, processes)
    ("tp2_pp1", ["parallel=tp2_pp1"], 2),
    ("tp1_pp2", ["parallel=tp1_pp2"], 2),
    ("dp2", ["parallel=tp1_pp1"], 2),
    ("dp2_distopt", ["parallel=tp1_pp1", "parallel.use_distributed_optimizer=true"], 2),
]
MODELS = ["gpt_tiny", "bert_tiny", "deberta_tiny"]
STEPS = 5
LORA = ["peft=lora", "peft.rank=4", "peft.alpha=16"]
# DoRA: the layouts whose arithmetic differs from LoRA's (the norms of split rows, split stages),
# and the distributed optimizer, which writes updated weights through ``.data`` (the cached norm
# must still be formed again after each step).
DORA_CASES = [("gpt_tiny", "tp2_pp1"), ("gpt_tiny", "tp1_pp2"), ("bert_tiny", "tp2_pp1"),
              ("gpt_tiny", "dp2_distopt")]


def _common(model, init, method="lora"):
    return [f"model={model}", *LORA, f"peft.method={method}", "task=listwise", "task.group_size=4",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            "trainer.log_interval=1", "trainer.eval_at_end=false", "trainer.save_final=false",
            "optim.lr=1e-2", "pair.max_length=64", f"trainer.max_steps={STEPS}",
            f"model.init_from={init}"]


def _resume_common(init):
    return ["model=gpt_tiny", *LORA, "peft.dropout=0.1", "task=listwise", "task.group_size=4",
            "trainer.max_steps=20", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
            "trainer.log_interval=1", "trainer.eval_at_end=false", "optim.lr=5e-3",
            "optim.warmup_steps=3", "pair.max_length=64", f"model.init_from={init}"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def bases(tmp):
    out = {}
    for model in MODELS:
        out[model] = tmp / f"init-{model}"
        # A wide initialisation, so that scores, losses and gradients are far from trivial.
        megarank.train_model([f"model={model}", f"trainer.output_dir={out[model]}",
                              "trainer.stop_at_step=0", "trainer.eval_at_end=false",
                              "model.init_method_std=0.1", "trainer.progress_bar=false"])
    return out


@pytest.fixture(scope="module")
def references(tmp, bases):
    out = {}
    for model in MODELS:
        run = tmp / f"ref-{model}"
        megarank.train_model([*_common(model, bases[model]), "parallel=tp1_pp1",
                              f"trainer.output_dir={run}", "trainer.progress_bar=false"])
        out[model] = [r for r in read_metrics(run) if "loss" in r]
    for model in sorted({m for m, _ in DORA_CASES}):
        run = tmp / f"ref-dora-{model}"
        megarank.train_model([*_common(model, bases[model], "dora"), "parallel=tp1_pp1",
                              f"trainer.output_dir={run}", "trainer.progress_bar=false"])
        out[f"dora-{model}"] = [r for r in read_metrics(run) if "loss" in r]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp, bases):
    cases = {f"{model}-{name}": train_case([*_common(model, bases[model]), *overrides])
             for model in MODELS for name, overrides, _ in LAYOUTS}
    layouts = {name: overrides for name, overrides, _ in LAYOUTS}
    for model, name in DORA_CASES:
        cases[f"dora-{model}-{name}"] = train_case(
            [*_common(model, bases[model], "dora"), *layouts[name]])
    # bf16 weights under TP, with and without full recompute.
    for recompute in ("none", "full"):
        cases[f"bf16_{recompute}"] = train_case(
            [*_common("gpt_tiny", bases["gpt_tiny"]), "parallel=tp2_pp1", "trainer.precision=bf16",
             f"trainer.recompute={recompute}"])
    # LoRA resume: 20 straight steps; 10 steps, stopped (its checkpoints copied as they are
    # then); resumed in the same directory to 20.
    common, split = _resume_common(bases["gpt_tiny"]), tmp / "split"
    cases["resume-full"] = train_case([*common, "trainer.save_final=false"])
    cases["resume-stop"] = train_case([*common, "trainer.stop_at_step=10"], output_dir=split)
    cases["resume-snapshot"] = cli_case("tests.helpers.dist_train_snapshot",
                                        [split / "checkpoints", tmp / "stopped-checkpoints"])
    cases["resume-resume"] = train_case([*common, "trainer.resume=true"], output_dir=split)
    return run_cases(cases, nproc=2)


def _by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("model", [*MODELS, "dora-gpt_tiny", "dora-bert_tiny"])
def test_reference_losses_move(references, model):
    ref = _by_step(references[model], "loss")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert max(ref.values()) - min(ref.values()) > 0.01, ref


@pytest.mark.parametrize(
    "model, name", [(m, name) for m in MODELS for name, _, _ in LAYOUTS]
    + [(f"dora-{m}", name) for m, name in DORA_CASES],
    ids=[f"{m}-{name}" for m in MODELS for name, _, _ in LAYOUTS]
    + [f"dora-{m}-{name}" for m, name in DORA_CASES])
def test_lora_layout_matches_single_process(references, two_ranks, model, name):
    ref, ref_gn = _by_step(references[model], "loss"), _by_step(references[model], "grad_norm")
    assert sorted(ref) == list(range(1, STEPS + 1))
    got = _by_step(two_ranks[f"{model}-{name}"], "loss")
    gn = _by_step(two_ranks[f"{model}-{name}"], "grad_norm")
    assert sorted(got) == sorted(ref), name
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (name, step, got, ref)
        assert gn[step] == pytest.approx(ref_gn[step], rel=1e-4), (name, step, gn, ref_gn)


def test_lora_bf16_full_recompute_follows_fp32(references, two_ranks):
    # bf16 weights under TP, with and without full recompute: recomputing the layers (and
    # their adapters) in backward changes nothing; the first loss is fp32's to bf16's
    # precision (later ones drift apart as Adam normalises bf16-rounded gradients).
    ref = _by_step(references["gpt_tiny"], "loss")
    bf16 = {r: _by_step(two_ranks[f"bf16_{r}"], "loss") for r in ("none", "full")}
    assert sorted(bf16["full"]) == sorted(ref)
    for step in ref:
        assert bf16["full"][step] == pytest.approx(bf16["none"][step], abs=1e-6), step
    assert bf16["full"][1] == pytest.approx(ref[1], abs=2e-2)


def test_lora_resume_matches_uninterrupted(tmp, bases, two_ranks):
    ckpt = tmp / "stopped-checkpoints" / "step_0000010"
    meta = json.loads((ckpt / "megarank.json").read_text())
    assert meta["base_weights"] == str(bases["gpt_tiny"])
    held = set(CheckpointTensors(ckpt))
    assert held and all(".lora." in n or n.startswith("head.") for n in held), sorted(held)[:4]
    assert len([n for n in held if ".lora." in n]) == 2 * 7 * 4  # (A, B) x 7 projections x 4 layers
    a = _by_step(two_ranks["resume-full"], "loss")
    b = _by_step(two_ranks["resume-resume"], "loss")
    assert sorted(b) == list(range(1, 21))
    assert min(a[s] for s in range(15, 21)) < a[1]
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])
