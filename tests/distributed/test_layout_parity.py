"""Layout parity: the same model, weights and data give the same per-step losses in every layout.

For each backbone a one-process run writes the initial weights (``trainer.stop_at_step=0``); each
layout then starts from them (``model.init_from``) and trains 5 steps in fp32 with dropout off.
Losses must match the single-process reference to 1e-5: the proof that TP/PP sharding, DP data
sharding and loss reduction are right.
"""

from __future__ import annotations

import pytest

from tests.helpers.runs import grad_norms, losses, read_metrics, run_train

pytestmark = pytest.mark.distributed

LAYOUTS = [  # (name, parallel config, processes)
    ("tp2_pp1", "tp2_pp1", 2),
    ("tp1_pp2", "tp1_pp2", 2),
    ("dp2", "tp1_pp1", 2),
    ("tp2_pp2", "tp2_pp2", 4),
]
STEPS = 5


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_layouts_match_single_process(model, tmp_path):
    _check_layouts(model, [], LAYOUTS, tmp_path)


def test_maxp_training_layouts_match_single_process(tmp_path):
    """MaxP at training: each micro-batch holds a varying number of window rows (Cranfield's
    documents are longer than 64 tokens), which pipeline stages pass on with their shapes and
    data-parallel ranks reduce per document."""
    ref = _check_layouts("bert_tiny", ["data.passages=max", "data.train_passages=3"],
                         [("tp1_pp2", "tp1_pp2", 2), ("dp2", "tp1_pp1", 2)], tmp_path)
    # MaxP was on: more real tokens a step than its documents can hold at 64 tokens each.
    for r in read_metrics(ref):
        if "tokens_per_s" in r:
            assert r["tokens_per_s"] > 64 * r["pairs_per_s"], r


def _check_layouts(model, extra, layouts, tmp_path):
    common = [f"model={model}", "task=listwise", "task.group_size=4", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_at_end=false",
              "trainer.save_final=false", "optim.lr=2e-3", "data.max_length=64", *extra]
    init = tmp_path / "init"
    # A wide initialisation makes scores (and so losses and gradients) far from trivial: with
    # std 0.02 every tiny-model score is ~0 and every loss ~ln(G), which proves little.
    run_train([f"model={model}", f"trainer.output_dir={init}", "trainer.stop_at_step=0",
               "trainer.eval_at_end=false", "model.init_method_std=0.1"])
    assert (init / "checkpoints" / "step_0000000").is_dir()

    ref_dir = tmp_path / "tp1_pp1"
    run_train([*common, "parallel=tp1_pp1", f"trainer.max_steps={STEPS}",
               f"trainer.output_dir={ref_dir}", f"model.init_from={init}"])
    ref = losses(ref_dir)
    ref_gn = grad_norms(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    # The losses must move from step to step, or equal losses would prove little.
    assert max(ref.values()) - min(ref.values()) > 0.01, ref

    for name, parallel, nproc in layouts:
        out = tmp_path / name
        run_train([*common, f"parallel={parallel}", f"trainer.max_steps={STEPS}",
                   f"trainer.output_dir={out}", f"model.init_from={init}"], nproc=nproc)
        got, gn = losses(out), grad_norms(out)
        assert sorted(got) == sorted(ref), name
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-5), (name, step, got, ref)
            # The global gradient norm (reduced over TP/PP/DP by megatron) agrees too.
            assert gn[step] == pytest.approx(ref_gn[step], rel=1e-4), (name, step, gn, ref_gn)
    return ref_dir
