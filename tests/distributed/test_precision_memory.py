"""Mixed precision, the distributed optimizer and activation recomputation through megatron's
own machinery, checked on CPU: recomputation and ZeRO-1 change no number; bf16/fp16 stay within
a stated tolerance of fp32; a bf16 distributed-optimizer run resumes exactly. And they save what
they claim: recomputation lowers the bytes autograd keeps for backward, ZeRO-1 the optimizer
state on each rank, each by a measured ratio (tests/distributed/memory_worker.py measures)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.runs import losses, run_module, run_train

pytestmark = pytest.mark.distributed

COMMON = ["model=gpt_tiny", "task.group_size=4", "trainer.max_steps=5", "trainer.log_interval=1",
          "trainer.eval_at_end=false", "trainer.save_final=false", "data.max_length=64",
          "optim.lr=1e-3", "model.init_method_std=0.1"]


def _run(tmp_path, name, extra, nproc=1):
    out = tmp_path / name
    run_train([*COMMON, f"trainer.output_dir={out}", *extra], nproc=nproc)
    return losses(out)


def test_recompute_changes_nothing(tmp_path):
    ref = _run(tmp_path, "none", [])
    for mode in ("selective", "full"):
        got = _run(tmp_path, mode, [f"trainer.recompute={mode}"])
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-6), (mode, step)


@pytest.mark.parametrize("precision, tol", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_half_precision_tracks_fp32(tmp_path, precision, tol):
    ref = _run(tmp_path, "fp32", [])
    got = _run(tmp_path, precision, [f"trainer.precision={precision}"])
    assert max(ref.values()) - min(ref.values()) > 0.05  # losses move, so the check means something
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=tol), (precision, step, got, ref)


def test_distributed_optimizer_matches_and_resumes(tmp_path):
    plain = _run(tmp_path, "plain", [], nproc=2)
    zero1 = _run(tmp_path, "zero1", ["parallel.use_distributed_optimizer=true"], nproc=2)
    for step in plain:
        assert zero1[step] == pytest.approx(plain[step], abs=1e-6), step

    # bf16 + ZeRO-1: stop after 3 steps, resume to 5, equal to the uninterrupted run.
    bf16 = ["parallel.use_distributed_optimizer=true", "trainer.precision=bf16"]
    full = _run(tmp_path, "bf16_full", bf16, nproc=2)
    split = tmp_path / "bf16_split"
    run_train([*COMMON, *bf16, f"trainer.output_dir={split}", "trainer.stop_at_step=3",
               "trainer.save_final=true"], nproc=2)
    run_train([*COMMON, *bf16, f"trainer.output_dir={split}", "trainer.resume=true"], nproc=2)
    resumed = losses(split)
    for step in range(4, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def _measure(tmp_path, what, overrides, nproc=1):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{what}.json"
    run_module("tests.distributed.memory_worker", [what, out, *overrides], nproc=nproc)
    return json.loads(out.read_text())


# 16 pairs (2 groups of 8) x 128 tokens through gpt_tiny (4 layers, hidden 64, SwiGLU 128).
ACTIVATIONS = ["model=gpt_tiny", "task.group_size=8", "trainer.micro_batch_size=2",
               "data.max_length=128", "trainer.device=cpu"]


def test_recompute_lowers_saved_activations(tmp_path):
    # Bytes of the tensors autograd saves during one forward of a micro-batch (one count per
    # storage, weights left out). Measured on the 2-core CPU machine:
    #   attention_dropout=0:   none 44,396,884   selective 44,265,828 (0.997x)   full 3,182,932 (0.072x)
    #   attention_dropout=0.1: none 93,548,884   selective 44,265,828 (0.473x)   full 3,182,932 (0.034x)
    # Without dropout, SDPA runs PyTorch's fused (flash) CPU kernel, which keeps no [b, h, s, s]
    # score matrix; megatron's selective recompute still checkpoints the core attention, but that
    # only drops its logsumexp ([b, heads, s] fp32 per layer, 131,072 bytes here). With attention
    # dropout SDPA takes its math path, which keeps the probabilities and the dropout mask, and
    # selective recompute removes them: the case it exists for.
    fused = _measure(tmp_path / "fused", "activations", ACTIVATIONS)
    dropout = _measure(tmp_path / "dropout", "activations",
                       [*ACTIVATIONS, "model.attention_dropout=0.1"])
    for got in (fused, dropout):
        assert got["none"]["batch_shape"] == [16, 128]  # a full-length batch: the ratios mean this
        for mode in ("selective", "full"):
            assert got[mode]["max_grad_diff_vs_none"] <= 1e-6, (mode, got)  # same gradients
        assert got["full"]["ratio_vs_none"] < 0.15, got  # each layer keeps only its input
    assert 0.99 < fused["selective"]["ratio_vs_none"] < 1.0, fused  # only the logsumexp goes
    assert fused["none"]["bytes"] - fused["selective"]["bytes"] >= 4 * 16 * 4 * 128 * 4 - 64
    assert dropout["selective"]["ratio_vs_none"] < 0.6, dropout  # the score matrices go
    assert dropout["selective"]["bytes"] <= fused["selective"]["bytes"] * 1.01


def test_zero1_shards_optimizer_state(tmp_path):
    # Each rank's Adam moments (and fp32 main weights with bf16) after one step on dp2. Measured:
    #   fp32: plain 16,847,872 B/rank, ZeRO-1 8,423,936 B/rank (0.500x)
    #   bf16: plain 25,271,808 B/rank (8,423,936 of it main weights), ZeRO-1 12,635,904 (0.500x)
    got = _measure(tmp_path, "optimizer", [*COMMON, "trainer.device=cpu"], nproc=2)
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
