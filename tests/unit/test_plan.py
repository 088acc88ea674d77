"""megarank.training.sizing: its figures against tensors measured on models built here, against
Megatron-LM's published formulas, and for the 7B/8B presets' real geometry. In one process.

Measured (megarank.training.memory, a world of one, CPU): weights, gradients and optimizer
state must equal the plan to the byte; the activations autograd saves for one micro-batch within
2% (they match to the byte but for a few small tensors), the peak of a training step within 15%.
"""

from __future__ import annotations

import math

import pytest

from megarank.bundle import build_bundle
from megarank.config import compose, padded_vocab_size
from megarank.training.flops import step_flops
from megarank.training.memory import measure_stage
from megarank.training.sizing import (
    GIB,
    fit,
    format_plan,
    gpu_memory,
    korthikanti_layer_bytes,
    layer_terms,
    paper_layer_terms,
    plan_memory,
    suggestions,
)
from tests.helpers.real_geometry import PRESETS, PUBLISHED_PARAMS, write_config_only

# 2 groups x 8 documents x 128 tokens per micro-batch, on the CPU.
SHAPE = ["task.group_size=8", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
         "pair.max_length=128", "trainer.device=cpu"]

MEASURED = {
    # decoder: RMSNorm (composite on the CPU), RoPE, GQA, SwiGLU, flash SDPA
    "gpt": ["model=gpt_tiny"],
    "gpt-full": ["model=gpt_tiny", "trainer.recompute=full"],
    # Qwen3-style: per-head q/k norms and head_dim != hidden / heads; the yes/no head
    "qwen3-yes_no": ["model=gpt_tiny", "model.qk_layernorm=true", "model.head_dim=24",
                     "pair.head=yes_no"],
    # encoder with dropout: the CPU dropout attention keeps [s, s] probabilities (its softmax's
    # in fp32), a bool mask and the dropped probabilities; selective recompute drops them
    "bert-dropout-bf16": ["model=bert_tiny", "model.hidden_dropout=0.1",
                          "model.attention_dropout=0.1", "trainer.precision=bf16"],
    "bert-dropout-selective": ["model=bert_tiny", "model.hidden_dropout=0.1",
                               "model.attention_dropout=0.1", "trainer.recompute=selective"],
    # DeBERTa: the disentangled terms' copies and [s, 2 span] scores, SDPA's math path for its
    # additive mask; with dropout and selective recompute of the core attention
    "deberta": ["model=deberta_tiny"],
    "deberta-dropout-bf16": ["model=deberta_tiny", "model.hidden_dropout=0.1",
                             "model.attention_dropout=0.1", "trainer.precision=bf16"],
    "deberta-dropout-selective": ["model=deberta_tiny", "model.hidden_dropout=0.1",
                                  "model.attention_dropout=0.1", "trainer.recompute=selective"],
    # bf16 with the distributed optimizer (dp 1: 18 bytes per parameter either way)
    "gpt-bf16-zero1": ["model=gpt_tiny", "trainer.precision=bf16",
                       "parallel.use_distributed_optimizer=true"],
}


@pytest.fixture(scope="module", params=sorted(MEASURED))
def planned_and_measured(request):
    overrides = [*SHAPE, *MEASURED[request.param]]
    plan = plan_memory(compose(overrides), 1, device="cpu")
    with build_bundle(compose(overrides), load_hf=False) as bundle:
        measured = measure_stage(bundle)
    return request.param, plan, measured


def test_model_state_equals_the_tensors(planned_and_measured):
    name, plan, m = planned_and_measured
    s = plan.stages[0]
    assert (s.params, s.weights, s.grads) == (m.params, m.weights, m.grads), name
    optim = s.optim_distributed if plan.distributed_optimizer else s.optim_plain
    assert optim == m.optimizer, name
    # Megatron-LM's bytes per parameter: bf16 18, fp32 16 (d = 1 here)
    per_param = (m.weights + m.grads + m.optimizer) / m.params
    assert per_param == (18 if plan.precision == "bf16" else 16), name


@pytest.mark.parametrize("name, overrides", [
    ("gpt-lora-bf16", ["model=gpt_tiny", "peft=lora", "peft.rank=8", "trainer.precision=bf16"]),
    ("bert-lora", ["model=bert_tiny", "peft=lora", "peft.rank=4",
                   "peft.targets=[linear_qkv,linear_fc2]"]),
    ("gpt-dora", ["model=gpt_tiny", "peft=dora", "peft.rank=4"]),  # + a magnitude per row
])
def test_lora_model_state_equals_the_tensors(name, overrides):
    # Gradients and optimizer state for the adapters and head only; the frozen base's weights.
    cfg = [*SHAPE, *overrides]
    plan = plan_memory(compose(cfg), 1, device="cpu")
    with build_bundle(compose(cfg), load_hf=False) as bundle:
        m = measure_stage(bundle)
    s = plan.stages[0]
    assert (s.params, s.weights, s.grads, s.optim_plain) == (
        m.params, m.weights, m.grads, m.optimizer), name
    assert m.grads < 0.2 * m.weights * (4 / 2 if "bf16" in name else 1), name
    # Activations: the frozen linears keep less than full fine-tuning's; the plan counts full
    # fine-tuning's terms, an upper bound here.
    assert m.saved <= s.saved_per_micro_batch[plan.recompute], name


def test_activations_within_their_tolerance(planned_and_measured):
    name, plan, m = planned_and_measured
    s, mode = plan.stages[0], plan.recompute
    want = s.saved_per_micro_batch[mode]
    assert m.saved == pytest.approx(want, rel=0.02), (name, m.saved, want)
    assert m.peak == pytest.approx(s.activations(mode), rel=0.15), (name, m.peak,
                                                                    s.activations(mode))


def test_the_recompute_modes_are_measured_apart(planned_and_measured):
    # The feature must change the number: full keeps a small fraction of none.
    name, plan, m = planned_and_measured
    s = plan.stages[0]
    assert s.saved_per_micro_batch["full"] < 0.2 * s.saved_per_micro_batch["none"], name
    if name == "gpt-full":
        assert m.saved < 0.1 * plan_memory(compose([*SHAPE, "model=gpt_tiny"]), 1, "cpu") \
            .stages[0].saved_per_micro_batch["none"]


def test_the_paper_formula_is_what_its_terms_add_up_to():
    # Korthikanti et al. 2022: sbh(34 + 5as/h); TP: sbh(10 + 24/t + 5as/(ht)); TP + SP:
    # sbh/t (34 + 5as/h); selective recompute drops 5as/h.
    s, b, h, a = 2048, 1, 12288, 96  # the paper's GPT-3 175B layer
    for t, sp in ((1, False), (8, False), (8, True)):
        terms = paper_layer_terms(h, a, t, sp, length=s)
        for mode, selective in (("none", False), ("selective", True)):
            got = sum(x.bytes(b, s) for x in terms if mode in x.kept)
            want = korthikanti_layer_bytes(s, b, h, a, t, sp, selective)
            assert got == pytest.approx(want, rel=1e-12), (t, sp, mode)
    assert korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)


def _paper_shaped(overrides=()):
    """A GPT layer shaped as the paper's: LayerNorm, 4h GeLU MLP with biases, MHA, dropout."""
    return compose(["model=gpt_tiny", "model.hidden_size=1024", "model.num_attention_heads=16",
                    "model.num_query_groups=16", "model.ffn_hidden_size=4096",
                    "model.normalization=LayerNorm", "model.activation=gelu",
                    "model.gated_linear_unit=false", "model.add_bias_linear=true",
                    "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                    "trainer.precision=bf16", *overrides])


def test_our_terms_against_the_paper_on_its_own_layer():
    # On GPUs (fused norms, flash attention), the paper's layer costs its 34 sbh, less nothing,
    # plus what RoPE and the fused QKV output add, plus fp32 norm statistics; the 5as/h
    # term is 0 (flash attention keeps no [s, s] matrix, only the log-sum-exp).
    cfg = _paper_shaped()
    h, heads, s = 1024, 16, 512
    for tp, sp in ((1, False), (2, False), (2, True)):
        cfg.parallel.sequence_parallel = sp
        ours = {x.name: x for x in layer_terms(cfg, tp, "cuda", s)}
        per_tok = {k: x.elements * x.width for k, x in ours.items()
                   if not x.per_position and "none" in x.kept}
        hs = h / tp if sp else h
        # the paper's terms, one by one (bytes per token)
        assert per_tok["norm 1 input (the layer input)"] == 2 * hs
        assert per_tok["QKV input (norm 1 output)"] == 2 * hs
        assert per_tok["attention output (projection input)"] == 2 * h / tp
        assert per_tok["attention dropout-add mask"] == hs  # 1-byte mask
        assert per_tok["norm 2 input"] == 2 * hs and per_tok["fc1 input (norm 2 output)"] == 2 * hs
        assert per_tok["fc1 output (activation input)"] == 2 * 4 * h / tp  # the GeLU input
        assert per_tok["fc2 input (activation output)"] == 2 * 4 * h / tp
        assert per_tok["MLP dropout-add mask"] == hs
        # Q and K (4h, paper) and V (2h) are RoPE's q and k copies plus the QKV output the
        # value view holds: 2h + 2h + 6h
        assert per_tok["query (after RoPE)"] + per_tok["key (after RoPE)"] == 4 * h / tp
        assert per_tok["QKV output (held by the value view)"] == 6 * h / tp
        paper = korthikanti_layer_bytes(s, 1, h, heads, tp, sp, selective=True) / s
        extra = (per_tok["QKV output (held by the value view)"] - 2 * h / tp  # V -> whole QKV
                 + per_tok["softmax log-sum-exp"] + per_tok["norm 1 statistics"]
                 + per_tok["norm 2 statistics"])
        assert sum(per_tok.values()) == pytest.approx(paper + extra, rel=1e-12), (tp, sp)
        # the paper's 5as/h: what flash attention does not keep
        assert korthikanti_layer_bytes(s, 1, h, heads, tp, sp) / s - paper == pytest.approx(
            5 * heads * s / tp, rel=1e-12)


def test_distributed_optimizer_bytes_per_parameter_follow_megatron():
    # Megatron-LM docs/source/api-guide/dist_optimizer.md: bf16 params + fp32 grads 18 plain,
    # 6 + 12/d distributed; fp32 16 and 8 + 8/d.
    for precision, plain, dist in (("bf16", 18, lambda d: 6 + 12 / d),
                                   ("fp32", 16, lambda d: 8 + 8 / d)):
        for dp in (1, 2, 4, 8):
            cfg = compose(["model=qwen2_7b", "parallel=tp4_pp2", f"trainer.precision={precision}",
                           f"trainer.global_batch_size={8 * dp}", "trainer.micro_batch_size=1"])
            for s in plan_memory(cfg, 8 * dp).stages:
                assert (s.weights + s.grads + s.optim_plain) / s.params == plain
                state = s.weights + s.grads + s.optim_distributed
                assert state / s.params == pytest.approx(dist(dp), rel=1e-9), (precision, dp)


def test_vocab_padding_and_flops_reuse_the_model_code():
    cfg = compose(["model=qwen2_7b", "parallel=tp4_pp2"])
    assert padded_vocab_size(cfg.model) == 152064
    plan = plan_memory(cfg, 16)
    seqs = cfg.trainer.global_batch_size * cfg.task.group_size
    assert plan.step_flops == step_flops(cfg.model, cfg.pair.max_length, seqs)
    # full recompute costs one more forward: a third of the model FLOPs of a step
    assert plan.recompute_flops["full"] == pytest.approx(plan.step_flops / 3, rel=1e-12)


@pytest.fixture(scope="module")
def geometry(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry")
    return {preset: write_config_only(root, name) for preset, name in PRESETS.items()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fit_an_h100_on_16_gpus(preset, geometry):
    cfg = compose([f"experiment={preset}", f"model.hf_path={geometry[preset]}",
                   "data.train_path=/data/triplets.jsonl"])
    plan = plan_memory(cfg, 16)
    assert (plan.tp, plan.pp, plan.dp) == (4, 2, 2)
    assert (plan.precision, plan.distributed_optimizer, plan.sequence_parallel) == (
        "bf16", True, True)
    # The whole model, with the LM output layer the classifiers drop, is the published count.
    name, hf = PRESETS[preset], _hf_model(geometry[preset])
    lm_head = 0 if cfg.pair.head == "yes_no" else hf.vocab_size * hf.hidden_size
    assert plan.total_params + lm_head == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005), name
    # Per GPU: 6 + 12/2 = 12 bytes per parameter of model state (bf16, ZeRO-1 over DP 2)
    first = plan.stages[0]
    assert (first.weights + first.grads + first.optim_distributed) / first.params == 12
    assert first.in_flight == 2 and plan.stages[1].in_flight == 1  # 1F1B on PP 2
    f = fit(plan, "H100-80GB")
    assert f.fits and 10 * GIB < f.needed < 25 * GIB, (preset, f.needed / GIB)
    # the distributed optimizer is what halves the optimizer state
    assert plan.total(distributed_optimizer=False) - f.needed == pytest.approx(
        first.optim_plain / 2, rel=1e-6)
    text = format_plan(plan, "H100-80GB")
    assert "fits" in text and "stage 1 (" in text and "TP 4 x PP 2 x DP 2" in text


def _hf_model(path):
    cfg = compose(["model=hf", f"model.hf_path={path}"])
    from megarank.checkpoint.hf import apply_hf_config

    apply_hf_config(cfg)
    return cfg.model


def test_a_7b_on_one_gpu_does_not_fit_80gb_and_the_plan_says_what_would(geometry):
    cfg = compose(["experiment=qwen2p5_7b_classifier", f"model.hf_path="
                   f"{geometry['qwen2p5_7b_classifier']}", "parallel=tp1_pp1",
                   "parallel.sequence_parallel=false", "trainer.global_batch_size=8"])
    plan = plan_memory(cfg, 1)
    f = fit(plan, "H100-80GB")
    # 18 bytes per parameter alone: 7.07e9 * 18 = 118.5 GiB
    assert not f.fits and f.needed > 7.0e9 * 18
    assert suggestions(plan, "H100-80GB") == []  # no recompute setting saves the model state
    assert "DOES NOT FIT" in format_plan(plan, "H100-80GB")
    h200 = fit(plan, "H200")
    assert not h200.fits  # 4,096 tokens x 28 layers of activations on top
    tips = suggestions(plan, "H200")
    assert tips and tips[0].startswith("trainer.recompute=full")
    assert fit(plan, "H200", recompute="full").fits


def test_a_missing_weights_directory_is_named(tmp_path):
    cfg = compose(["experiment=qwen3_reranker_8b", f"model.hf_path={tmp_path / 'nowhere'}",
                   "data.train_path=/x"])
    with pytest.raises(FileNotFoundError, match="nowhere does not exist: the plan reads the "
                                                "model's geometry"):
        plan_memory(cfg, 16)
    (tmp_path / "empty").mkdir()
    cfg.model.hf_path = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        plan_memory(cfg, 16)
    with pytest.raises(ValueError, match="model.hf_path is not set"):
        plan_memory(compose(["experiment=qwen3_reranker_8b", "data.train_path=/x"]), 16)


def test_a_layout_that_does_not_divide_is_refused():
    from megarank.config import ConfigError

    with pytest.raises(ConfigError, match="world size \\(12\\) must be divisible"):
        plan_memory(compose(["model=qwen2_7b", "parallel=tp4_pp2"]), 12)


def test_gpu_names_and_sizes():
    assert gpu_memory("H100-80GB") == ("H100-80GB", 80 * GIB)
    assert gpu_memory("h100") == ("H100-80GB", 80 * GIB)  # one size: the bare name will do
    assert gpu_memory("H200") == ("H200-141GB", 141 * GIB)
    assert gpu_memory("a100_40gb")[1] == 40 * GIB
    assert gpu_memory("80GB")[1] == gpu_memory("80")[1] == gpu_memory("80 GiB")[1] == 80 * GIB
    with pytest.raises(ValueError, match="one of H100-80GB"):
        gpu_memory("A100")  # two sizes: say which
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu_memory("Z100")
    assert math.isclose(fit(plan_memory(compose(["model=gpt_tiny"]), 1), "24GB",
                            headroom=0.5).usable, 12 * GIB)


def test_maxp_training_plans_every_window():
    """Under data.passages=max a document is up to data.train_passages sequences at training:
    activations and FLOPs are planned at that many (its most); FirstP plans one."""
    from megarank.config import ConfigError, validate

    base = [*SHAPE, "model=bert_tiny"]
    first = plan_memory(compose(base), 1, device="cpu")
    maxp = plan_memory(compose([*base, "data.passages=max", "data.train_passages=3"]), 1, "cpu")
    assert (first.windows, maxp.windows) == (1, 3) and maxp.sequences == 3 * first.sequences
    assert maxp.step_flops == pytest.approx(3 * first.step_flops)
    saved = [p.largest.saved_per_micro_batch["none"] for p in (first, maxp)]
    assert saved[1] > 2.5 * saved[0]
    assert "x 3 windows (MaxP)" in format_plan(maxp)
    with pytest.raises(ConfigError, match="data.train_passages"):
        validate(compose([*base, "data.train_passages=0"]), world_size=1)


def test_a_token_budget_is_planned_as_full_length_sequences_and_the_largest_that_fits_found():
    """data.tokens_per_micro_batch: the micro-batch planned as budget / length sequences at full
    length, so a budget of two groups' tokens plans what two full groups of fixed micro-batches
    do; `largest_token_budget` returns a budget that fits the card while one step more does not."""
    from megarank.training.sizing import largest_token_budget

    base = ["model=qwen2_0p5b", "trainer.precision=bf16", "pair.max_length=512",
            "data.packing=true", "task.group_size=8", "trainer.global_batch_size=8"]
    fixed = plan_memory(compose([*base, "trainer.micro_batch_size=2"]), 1, "cuda")
    budget = plan_memory(compose([*base, "data.tokens_per_micro_batch=8192"]), 1, "cuda")
    assert budget.sequences == fixed.sequences == 16
    assert budget.largest.saved_per_micro_batch == fixed.largest.saved_per_micro_batch
    assert "at most 8,192 tokens" in format_plan(budget)
    cfg = compose(base)
    best = largest_token_budget(cfg, 1, "H100-80GB")
    assert best % 64 == 0 and best >= 8 * 512
    at = plan_memory(compose([*base, f"data.tokens_per_micro_batch={best}"]), 1, "cuda")
    over = plan_memory(compose([*base, f"data.tokens_per_micro_batch={best + 64}"]), 1, "cuda")
    assert fit(at, "H100-80GB").fits and not fit(over, "H100-80GB").fits
    # A card too small for one group at full length has no budget.
    assert largest_token_budget(cfg, 1, "4GB") is None
