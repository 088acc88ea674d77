"""Layout parity: the same model, weights and data give the same per-step losses in every layout.

For each backbone a one-process run writes the initial weights (``trainer.stop_at_step=0``); each
layout then starts from them (``model.init_from``) and trains 5 steps in fp32 with dropout off.
Losses must match the single-process reference to 1e-5: the proof that TP/PP sharding, DP data
sharding and loss reduction are right.

The initial weights and the references are trained in this process; every two-rank layout runs
in one torchrun launch and every four-rank one in another (tests.helpers.cases).
"""

from __future__ import annotations

import pytest

import megarank
from tests.helpers.cases import run_cases, train_case
from tests.helpers.runs import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = [  # (name, parallel config, processes)
    ("tp2_pp1", "tp2_pp1", 2),
    ("tp1_pp2", "tp1_pp2", 2),
    ("dp2", "tp1_pp1", 2),
    ("tp2_pp2", "tp2_pp2", 4),
]
STEPS = 5
# MaxP at training: each micro-batch holds a varying number of window rows (Cranfield's
# documents are longer than 64 tokens), which pipeline stages pass on with their shapes and
# data-parallel ranks reduce per document.
MAXP = ["data.passages=max", "data.train_passages=3"]
REFERENCES = {  # name -> (model, extra overrides, layouts)
    "gpt_tiny": ("gpt_tiny", [], LAYOUTS),
    "bert_tiny": ("bert_tiny", [], LAYOUTS),
    "bert_tiny-maxp": ("bert_tiny", MAXP, [("tp1_pp2", "tp1_pp2", 2), ("dp2", "tp1_pp1", 2)]),
    # DeBERTa: the relative-position table is held by every pipeline stage (its gradients summed
    # over the stages) and projected by each TP rank's heads.
    "deberta_tiny": ("deberta_tiny", [], [("tp2_pp1", "tp2_pp1", 2), ("tp1_pp2", "tp1_pp2", 2)]),
}
MODELS = ("gpt_tiny", "bert_tiny", "deberta_tiny")
CASES = [(ref, *layout) for ref, (_, _, layouts) in REFERENCES.items() for layout in layouts]


def _common(model, extra):
    return [f"model={model}", "task=listwise", "task.group_size=4", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_at_end=false",
            "trainer.save_final=false", "optim.lr=2e-3", "pair.max_length=64", *extra,
            f"trainer.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout-init")
    out = {}
    for model in MODELS:
        out[model] = tmp / model
        # A wide initialisation makes scores (and so losses and gradients) far from trivial:
        # with std 0.02 every tiny-model score is ~0 and every loss ~ln(G), which proves little.
        megarank.train_model([f"model={model}", f"trainer.output_dir={out[model]}",
                              "trainer.stop_at_step=0", "trainer.eval_at_end=false",
                              "model.init_method_std=0.1", "trainer.progress_bar=false"])
    return out


@pytest.fixture(scope="module")
def references(inits, tmp_path_factory):
    """name -> every record the single-process run logged."""
    tmp = tmp_path_factory.mktemp("layout-ref")
    out = {}
    for name, (model, extra, _) in REFERENCES.items():
        run = tmp / name
        megarank.train_model([*_common(model, extra), "parallel=tp1_pp1",
                              f"trainer.output_dir={run}", f"model.init_from={inits[model]}",
                              "trainer.progress_bar=false"])
        out[name] = read_metrics(run)
    return out


def _launch(inits, nproc):
    cases = {f"{ref}-{name}": train_case([*_common(model, extra), f"parallel={parallel}",
                                          f"model.init_from={inits[model]}"])
             for ref, name, parallel, n in CASES if n == nproc
             for model, extra, _ in [REFERENCES[ref]]}
    return run_cases(cases, nproc=nproc)


@pytest.fixture(scope="module")
def two_ranks(inits):
    return _launch(inits, 2)


@pytest.fixture(scope="module")
def four_ranks(inits):
    return _launch(inits, 4)


def _by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("model", MODELS)
def test_initial_weights_written(inits, model):
    assert (inits[model] / "checkpoints" / "step_0000000").is_dir()


@pytest.mark.parametrize("ref", list(REFERENCES))
def test_reference_losses_move(references, ref):
    losses = _by_step(references[ref], "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    # The losses must move from step to step, or equal losses would prove little.
    assert max(losses.values()) - min(losses.values()) > 0.01, losses


def test_maxp_reference_trains_on_windows(references):
    # MaxP was on: more real tokens a step than its documents can hold at 64 tokens each.
    for r in references["bert_tiny-maxp"]:
        if "tokens_per_s" in r:
            assert r["tokens_per_s"] > 64 * r["pairs_per_s"], r


@pytest.mark.parametrize("ref, name, parallel, nproc", CASES,
                         ids=[f"{ref}-{name}" for ref, name, _, _ in CASES])
def test_layout_matches_single_process(request, references, ref, name, parallel, nproc):
    runs = request.getfixturevalue("two_ranks" if nproc == 2 else "four_ranks")
    records = runs[f"{ref}-{name}"]
    ref_losses, ref_gn = _by_step(references[ref], "loss"), _by_step(references[ref], "grad_norm")
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    got, gn = _by_step(records, "loss"), _by_step(records, "grad_norm")
    assert sorted(got) == sorted(ref_losses), name
    for step in ref_losses:
        assert got[step] == pytest.approx(ref_losses[step], abs=1e-5), (name, step, got,
                                                                        ref_losses)
        # The global gradient norm (reduced over TP/PP/DP by megatron) agrees too.
        assert gn[step] == pytest.approx(ref_gn[step], rel=1e-4), (name, step, gn, ref_gn)
