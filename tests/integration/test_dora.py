"""DoRA in one process: PEFT DoRA adapters (non-trivial magnitudes and B) in and out with
PeftModel's scores, the merged export, training from an HF base and from ``model.init_from``
(starting at the base's scores, then moving), and the refusals. Layout parity is in
tests/distributed/test_lora_layouts.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

import megarank
from megarank.checkpoint.stream import CheckpointTensors
from tests.helpers.hf_tiny import save_tiny
from tests.integration.test_lora import (
    TOL,
    _hf_scores,
    _pairs,
    _peft_adapter,
    assert_exports_score_as_trained,
)


@pytest.mark.parametrize("kind", ["llama", "bert", "deberta"])
def test_peft_dora_adapter_in_and_out_scores_as_peft(kind, tmp_path):
    base_dir = save_tiny(kind, tmp_path)
    peft_model = _peft_adapter(base_dir, tmp_path / "adapter", kind, dora=True)
    pairs, bert = _pairs(), kind == "bert"

    ckpt = megarank.convert_from_hf(base_dir, tmp_path / "ckpt", adapter=tmp_path / "adapter")
    with megarank.load_scorer(ckpt) as scorer:
        ours = torch.tensor(scorer.score(pairs))
        collator = scorer.bundle.collator
        assert scorer.bundle.cfg.peft.method == "dora"
    theirs = _hf_scores(peft_model, collator, pairs, bert)
    # The same A, B and head as plain LoRA: the magnitudes alone move the scores by far more
    # than the tolerance.
    lora_like = _hf_scores(_as_lora(peft_model), collator, pairs, bert)
    assert (theirs - lora_like).abs().max() > 100 * TOL
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    held = set(CheckpointTensors(ckpt))
    assert len([n for n in held if ".lora.m" in n]) == 4 * (7 if kind == "llama" else 6)

    adapter = megarank.convert_to_hf(ckpt, tmp_path / "out_adapter", adapter=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    again = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(_hf_scores(again, collator, pairs, bert), theirs, atol=TOL, rtol=0)
    merged = megarank.convert_to_hf(ckpt, tmp_path / "merged")
    torch.testing.assert_close(
        _hf_scores(AutoModelForSequenceClassification.from_pretrained(merged), collator, pairs,
                   bert), theirs, atol=TOL, rtol=0)


def _as_lora(peft_model):
    """The PEFT model's scores with each DoRA magnitude reset to ``||W + s B A||`` (LoRA)."""
    import copy

    lora = copy.deepcopy(peft_model)
    with torch.no_grad():
        for module in lora.modules():
            mags = getattr(module, "lora_magnitude_vector", None)
            if mags and "default" in mags:
                w = module.get_base_layer().weight
                delta = module.get_delta_weight("default")
                mags["default"].weight.copy_(torch.linalg.vector_norm(w + delta, dim=1))
    return lora


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


def test_trained_dora_exports_score_as_the_trained_model(tmp_path):
    from tests.integration.test_lora import _train

    base_dir = save_tiny("llama", tmp_path)
    run = tmp_path / "run"
    _train(run, base_dir, 6, extra=["peft.method=dora"])
    losses = _losses(run)
    assert len(losses) == 6 and min(losses[3:]) < losses[0], losses
    pairs = _pairs()
    with megarank.load_scorer(run) as scorer:
        trained = torch.tensor(scorer.score(pairs))
        collator = scorer.bundle.collator
    held = CheckpointTensors(run / "checkpoints" / "step_0000006")
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    # Training moved the magnitudes off the norms of W's rows they started at.
    m = held["backbone.decoder.layers.0.mlp.linear_fc2.lora.m0"]
    w = base.model.layers[0].mlp.down_proj.weight
    assert (m - torch.linalg.vector_norm(w, dim=1)).abs().max() > 1e-4
    assert (trained - _hf_scores(base, collator, pairs, False)).abs().max() > 1e-3

    assert_exports_score_as_trained(run, base_dir, collator, pairs, trained, tmp_path)


def test_dora_from_init_from_starts_at_the_base(tmp_path):
    # The base checkpoint is loaded after the model (and the optimizer) are built from another
    # initialisation: the magnitudes, and bf16's fp32 main copies of them, must follow it.
    common = ["model=gpt_tiny", "task.group_size=4", "trainer.global_batch_size=4",
              "trainer.micro_batch_size=2", "trainer.log_interval=1", "trainer.eval_interval=0",
              "trainer.eval_at_end=false", "trainer.progress_bar=false", "pair.max_length=48"]
    init = tmp_path / "init"
    megarank.train_model([*common, "trainer.stop_at_step=0", "model.init_method_std=0.1",
                          f"trainer.output_dir={init}"])
    run = tmp_path / "run"
    megarank.train_model([*common, "peft=dora", "peft.rank=4", "trainer.max_steps=1",
                          "trainer.precision=bf16", "optim.lr=1e-7", "trainer.save_interval=1",
                          f"model.init_from={init / 'checkpoints' / 'step_0000000'}",
                          f"trainer.output_dir={run}"])
    pairs = _pairs()
    with megarank.load_scorer(init) as scorer:
        base = torch.tensor(scorer.score(pairs))
    with megarank.load_scorer(run, ["trainer.precision=fp32"]) as scorer:
        dora = torch.tensor(scorer.score(pairs))
    assert base.abs().max() > 0.1
    # One step at lr 1e-7 from B = 0 and m = ||W||: the base, to bf16's rounding of m.
    torch.testing.assert_close(dora, base, atol=2e-2, rtol=0)


def test_dora_refusals(tmp_path):
    from megarank.checkpoint.adapters import read_adapter
    from megarank.checkpoint.hf import ConversionError
    from megarank.config import ConfigError, compose, validate

    base_dir = save_tiny("llama", tmp_path)
    _peft_adapter(base_dir, tmp_path / "dora", "llama", dora=True)
    with pytest.raises(ValueError, match="QDoRA"):
        megarank.convert_from_hf(base_dir, tmp_path / "q", ["peft.method=qlora"],
                                 adapter=tmp_path / "dora")
    conf_file = tmp_path / "dora" / "adapter_config.json"
    conf = json.loads(conf_file.read_text())
    conf_file.write_text(json.dumps({**conf, "use_rslora": True}))
    with pytest.raises(ConversionError, match="use_rslora=true"):
        read_adapter(tmp_path / "dora")
    # A LoRA adapter into a DoRA model: no magnitudes to place.
    lora = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir),
                          LoraConfig(r=4, target_modules=["q_proj"], task_type=TaskType.SEQ_CLS))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ConversionError, match="lacks a DoRA lora_magnitude_vector"):
        megarank.convert_from_hf(base_dir, tmp_path / "l", ["peft.method=dora"],
                                 adapter=tmp_path / "lora")
    with pytest.raises(ConfigError, match="lora/qlora/dora runs on megatron's local layers"):
        validate(compose(["peft=dora", "trainer.kernels=te"]), 1)
    validate(compose(["peft=dora"]), 1)  # the preset itself is valid
