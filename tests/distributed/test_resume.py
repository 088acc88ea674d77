"""Resume: stop after 20 steps, resume to 40; steps 21-40 equal an uninterrupted 40-step run.

Run with two data-parallel ranks and dropout on, so the sampler position, the optimizer state
(Adam moments and steps), the LR schedule and every rank's RNG streams must all be restored.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.runs import losses, run_train

pytestmark = pytest.mark.distributed


def test_resume_matches_uninterrupted(tmp_path):
    common = ["model=gpt_tiny", "task=listwise", "task.group_size=4", "trainer.max_steps=40",
              "trainer.global_batch_size=4", "trainer.micro_batch_size=1", "trainer.log_interval=1",
              "trainer.eval_at_end=false", "optim.lr=1e-3", "optim.warmup_steps=5",
              "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "data.max_length=64"]
    full = tmp_path / "full"
    run_train([*common, f"trainer.output_dir={full}", "trainer.save_final=false"], nproc=2)

    split = tmp_path / "split"
    run_train([*common, f"trainer.output_dir={split}", "trainer.stop_at_step=20"], nproc=2)
    ckpts = split / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000020"
    meta = json.loads((ckpts / "step_0000020" / "megarank.json").read_text())
    assert meta["train_state"] == {"step": 20, "consumed_samples": 80}
    assert not list(ckpts.glob("*.partial"))

    run_train([*common, f"trainer.output_dir={split}", "trainer.resume=true"], nproc=2)
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 41))
    assert a[40] < a[1]
    for step in range(21, 41):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])


def test_resume_into_another_layout_continues_exactly(tmp_path):
    # tp2_pp1 for 10 steps, then resumed as tp1_pp2: the model and Adam state are resharded
    # from the checkpoint. Dropout is off: dropout streams are per TP rank, so they cannot
    # carry over to another layout.
    common = ["model=gpt_tiny", "task=listwise", "task.group_size=4", "trainer.max_steps=20",
              "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_interval=1",
              "trainer.eval_at_end=false", "optim.lr=1e-3", "optim.warmup_steps=2",
              "data.max_length=64"]
    full = tmp_path / "full"
    run_train([*common, "parallel=tp2_pp1", f"trainer.output_dir={full}",
               "trainer.save_final=false"], nproc=2)
    split = tmp_path / "split"
    run_train([*common, "parallel=tp2_pp1", f"trainer.output_dir={split}",
               "trainer.stop_at_step=10"], nproc=2)
    run_train([*common, "parallel=tp1_pp2", f"trainer.output_dir={split}", "trainer.resume=true"],
              nproc=2)
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 21)), sorted(b)
    resumed = (split / "config.yaml").read_text()
    assert "pipeline_model_parallel_size: 2" in resumed  # the second part really ran as pp2
    # Adam moments restored: a fresh optimizer at step 11 would move the loss by far more.
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])
