"""LoRA under every layout: from the same base and adapters, 5 steps of losses (and gradient
norms) under tp2, pp2 and dp2 (also with the distributed optimizer) equal one process's, for a
decoder and an encoder; a bf16 run with full recompute follows the fp32 one; and a LoRA run
resumed after 10 steps equals 20 straight steps, with checkpoints that hold only adapters, head
and optimizer state, the base being referenced."""

from __future__ import annotations

import json

import pytest

from megarank.checkpoint.stream import CheckpointTensors
from tests.helpers.runs import grad_norms, losses, run_train

pytestmark = pytest.mark.distributed

LAYOUTS = [  # (name, overrides, processes)
    ("tp2_pp1", ["parallel=tp2_pp1"], 2),
    ("tp1_pp2", ["parallel=tp1_pp2"], 2),
    ("dp2", ["parallel=tp1_pp1"], 2),
    ("dp2_distopt", ["parallel=tp1_pp1", "parallel.use_distributed_optimizer=true"], 2),
]
STEPS = 5
LORA = ["peft=lora", "peft.rank=4", "peft.alpha=16"]


def _base(tmp_path, model):
    init = tmp_path / "init"
    # A wide initialisation, so that scores, losses and gradients are far from trivial.
    run_train([f"model={model}", f"trainer.output_dir={init}", "trainer.stop_at_step=0",
               "trainer.eval_at_end=false", "model.init_method_std=0.1"])
    return init


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_lora_layouts_match_single_process(model, tmp_path):
    init = _base(tmp_path, model)
    common = [f"model={model}", *LORA, "task=listwise", "task.group_size=4",
              "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
              "trainer.log_interval=1", "trainer.eval_at_end=false", "trainer.save_final=false",
              "optim.lr=1e-2", "data.max_length=64", f"trainer.max_steps={STEPS}",
              f"model.init_from={init}"]
    ref_dir = tmp_path / "ref"
    run_train([*common, "parallel=tp1_pp1", f"trainer.output_dir={ref_dir}"])
    ref, ref_gn = losses(ref_dir), grad_norms(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert max(ref.values()) - min(ref.values()) > 0.01, ref
    for name, overrides, nproc in LAYOUTS:
        out = tmp_path / name
        run_train([*common, *overrides, f"trainer.output_dir={out}"], nproc=nproc)
        got, gn = losses(out), grad_norms(out)
        assert sorted(got) == sorted(ref), name
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-5), (name, step, got, ref)
            assert gn[step] == pytest.approx(ref_gn[step], rel=1e-4), (name, step, gn, ref_gn)
    if model == "gpt_tiny":
        # bf16 weights under TP, with and without full recompute: recomputing the layers (and
        # their adapters) in backward changes nothing; the first loss is fp32's to bf16's
        # precision (later ones drift apart as Adam normalises bf16-rounded gradients).
        bf16 = {}
        for recompute in ("none", "full"):
            out = tmp_path / f"bf16_{recompute}"
            run_train([*common, "parallel=tp2_pp1", "trainer.precision=bf16",
                       f"trainer.recompute={recompute}", f"trainer.output_dir={out}"], nproc=2)
            bf16[recompute] = losses(out)
        assert sorted(bf16["full"]) == sorted(ref)
        for step in ref:
            assert bf16["full"][step] == pytest.approx(bf16["none"][step], abs=1e-6), step
        assert bf16["full"][1] == pytest.approx(ref[1], abs=2e-2)


def test_lora_resume_matches_uninterrupted(tmp_path):
    init = _base(tmp_path, "gpt_tiny")
    common = ["model=gpt_tiny", *LORA, "peft.dropout=0.1", "task=listwise", "task.group_size=4",
              "trainer.max_steps=20", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
              "trainer.log_interval=1", "trainer.eval_at_end=false", "optim.lr=5e-3",
              "optim.warmup_steps=3", "data.max_length=64", f"model.init_from={init}"]
    full = tmp_path / "full"
    run_train([*common, f"trainer.output_dir={full}", "trainer.save_final=false"], nproc=2)
    split = tmp_path / "split"
    run_train([*common, f"trainer.output_dir={split}", "trainer.stop_at_step=10"], nproc=2)
    ckpt = split / "checkpoints" / "step_0000010"
    meta = json.loads((ckpt / "megarank.json").read_text())
    assert meta["base_weights"] == str(init)
    held = set(CheckpointTensors(ckpt))
    assert held and all(".lora." in n or n.startswith("head.") for n in held), sorted(held)[:4]
    assert len([n for n in held if ".lora." in n]) == 2 * 7 * 4  # (A, B) x 7 projections x 4 layers
    run_train([*common, f"trainer.output_dir={split}", "trainer.resume=true"], nproc=2)
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 21))
    assert min(a[s] for s in range(15, 21)) < a[1]
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])
