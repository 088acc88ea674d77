"""Mixed precision, the distributed optimizer and activation recomputation through megatron's
own machinery, checked on CPU: recomputation and ZeRO-1 change no number; bf16/fp16 stay within
a stated tolerance of fp32; a bf16 distributed-optimizer run resumes exactly. And they save what
they claim: recomputation lowers the bytes autograd keeps for backward, ZeRO-1 the optimizer
state on each rank, each by a measured ratio (tests/distributed/memory_worker.py measures).

The one-process runs and measurements run in this process; every two-rank run and measurement is
a case of ONE torchrun launch (tests.helpers.cases)."""

from __future__ import annotations

import json

import pytest

import megarank
from tests.helpers.cases import cli_case, run_cases, train_case
from tests.helpers.runs import run_cli

pytestmark = pytest.mark.distributed

COMMON = ["model=gpt_tiny", "task.group_size=4", "trainer.max_steps=5", "trainer.log_interval=1",
          "trainer.eval_at_end=false", "trainer.save_final=false", "pair.max_length=64",
          "optim.lr=1e-3", "model.init_method_std=0.1"]
SINGLE = {"fp32": [], "selective": ["trainer.recompute=selective"],
          "full": ["trainer.recompute=full"], "bf16": ["trainer.precision=bf16"],
          "fp16": ["trainer.precision=fp16"]}
BF16_ZERO1 = ["parallel.use_distributed_optimizer=true", "trainer.precision=bf16"]


def _losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """name -> step -> loss of the one-process runs (fp32, recompute, half precision)."""
    tmp = tmp_path_factory.mktemp("precision")
    out = {}
    for name, extra in SINGLE.items():
        megarank.train_model([*COMMON, f"trainer.output_dir={tmp / name}", *extra,
                              "trainer.progress_bar=false"])
        out[name] = _losses(
            json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines())
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The dp2 runs (plain, ZeRO-1, a bf16 ZeRO-1 run uninterrupted and stopped at step 3 then
    resumed to 5) and the optimizer-state measurement, in one launch."""
    tmp = tmp_path_factory.mktemp("zero1")
    split = tmp / "bf16_split"
    results = run_cases({
        "plain": train_case(COMMON),
        "zero1": train_case([*COMMON, "parallel.use_distributed_optimizer=true"]),
        "bf16_full": train_case([*COMMON, *BF16_ZERO1]),
        "bf16_stop": train_case([*COMMON, *BF16_ZERO1, "trainer.stop_at_step=3",
                                 "trainer.save_final=true"], output_dir=split),
        "bf16_resume": train_case([*COMMON, *BF16_ZERO1, "trainer.resume=true"],
                                  output_dir=split),
        "optimizer": cli_case("tests.distributed.memory_worker",
                              ["optimizer", tmp / "optimizer.json", *COMMON,
                               "trainer.device=cpu"]),
    }, nproc=2)
    results["optimizer"] = json.loads((tmp / "optimizer.json").read_text())
    return results


@pytest.mark.slow
def test_recompute_changes_nothing(single):
    ref = single["fp32"]
    for mode in ("selective", "full"):
        got = single[mode]
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-6), (mode, step)


@pytest.mark.slow
@pytest.mark.parametrize("precision, tol", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_half_precision_tracks_fp32(single, precision, tol):
    ref, got = single["fp32"], single[precision]
    assert max(ref.values()) - min(ref.values()) > 0.05  # losses move, so the check means something
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=tol), (precision, step, got, ref)


@pytest.mark.slow
def test_distributed_optimizer_matches_and_resumes(two_ranks):
    plain, zero1 = _losses(two_ranks["plain"]), _losses(two_ranks["zero1"])
    for step in plain:
        assert zero1[step] == pytest.approx(plain[step], abs=1e-6), step

    # bf16 + ZeRO-1: stop after 3 steps, resume to 5, equal to the uninterrupted run.
    full, resumed = _losses(two_ranks["bf16_full"]), _losses(two_ranks["bf16_resume"])
    for step in range(4, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def _activations(tmp_path, overrides):
    out = tmp_path / "activations.json"
    run_cli("tests.distributed.memory_worker", ["activations", out, *overrides])
    return json.loads(out.read_text())


# 16 pairs (2 groups of 8) x 128 tokens through gpt_tiny (4 layers, hidden 64, SwiGLU 128).
ACTIVATIONS = ["model=gpt_tiny", "task.group_size=8", "trainer.micro_batch_size=2",
               "pair.max_length=128", "trainer.device=cpu"]


def test_recompute_lowers_saved_activations(tmp_path):
    # Bytes of the tensors autograd saves during one forward of a micro-batch (one count per
    # storage, weights left out). Measured on the 2-core CPU machine:
    #   attention_dropout=0:   none 44,396,884   selective 44,265,828 (0.997x)   full 3,182,932 (0.072x)
    #   attention_dropout=0.1: none 93,548,884   selective 44,265,828 (0.473x)   full 3,182,932 (0.034x)
    # Without dropout, SDPA runs PyTorch's fused (flash) CPU kernel, which keeps no [b, h, s, s]
    # score matrix; megatron's selective recompute still checkpoints the core attention, but that
    # only drops its logsumexp ([b, heads, s] fp32 per layer, 131,072 bytes here). With attention
    # dropout SDPA takes its math path, which keeps the probabilities and the dropout mask, and
    # selective recompute removes them: the case it exists for. (These were measured with every
    # row of the last layer computed; with trainer.pooled_last_layer the last layer computes
    # one row per pair and selective recompute leaves its core attention alone, so the fused
    # case drops the logsumexp of the 3 layers before it.)
    (tmp_path / "fused").mkdir()
    (tmp_path / "dropout").mkdir()
    fused = _activations(tmp_path / "fused", ACTIVATIONS)
    dropout = _activations(tmp_path / "dropout", [*ACTIVATIONS, "model.attention_dropout=0.1"])
    for got in (fused, dropout):
        assert got["none"]["batch_shape"] == [16, 128]  # a full-length batch: the ratios mean this
        for mode in ("selective", "full"):
            assert got[mode]["max_grad_diff_vs_none"] <= 1e-6, (mode, got)  # same gradients
        assert got["full"]["ratio_vs_none"] < 0.15, got  # each layer keeps only its input
    assert 0.99 < fused["selective"]["ratio_vs_none"] < 1.0, fused  # only the logsumexp goes
    assert fused["none"]["bytes"] - fused["selective"]["bytes"] >= 3 * 16 * 4 * 128 * 4 - 64
    assert dropout["selective"]["ratio_vs_none"] < 0.6, dropout  # the score matrices go
    assert dropout["selective"]["bytes"] <= fused["selective"]["bytes"] * 1.01


@pytest.mark.slow
def test_zero1_shards_optimizer_state(two_ranks):
    # Each rank's Adam moments (and fp32 main weights with bf16) after one step on dp2. Measured:
    #   fp32: plain 16,847,872 B/rank, ZeRO-1 8,423,936 B/rank (0.500x)
    #   bf16: plain 25,271,808 B/rank (8,423,936 of it main weights), ZeRO-1 12,635,904 (0.500x)
    got = two_ranks["optimizer"]
    for precision in ("fp32", "bf16"):
        plain, zero1 = got[f"{precision}/plain"], got[f"{precision}/zero1"]
        assert len(plain) == len(zero1) == 2
        for p, z in zip(plain, zero1, strict=True):
            assert p["optimized_elements"] == p["model_params"]  # every weight, on every rank
            assert 0.45 <= z["total"] / p["total"] <= 0.55, (precision, p, z)
            assert z["grad_norm"] == pytest.approx(p["grad_norm"], abs=1e-6)
        # The two shards hold the plain state between them, nothing more and nothing twice.
        for key in ("moments", "main_params", "optimized_elements"):
            assert sum(z[key] for z in zero1) == plain[0][key], (precision, key)
        main = plain[0]["main_params"]
        assert main == (4 * plain[0]["model_params"] if precision == "bf16" else 0), plain
