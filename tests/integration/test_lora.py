"""LoRA in one process: PEFT adapters in and out with the same scores, training that moves only
adapters and head, merged and adapter exports that score as the trained model, and the
config's refusals. Layout parity and resume are in tests/distributed/test_lora_layouts.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

import megarank
from megarank.checkpoint.stream import CheckpointTensors
from megarank.config import ConfigError, compose, validate
from megarank.data.triplets import read_triplets
from tests.helpers.hf_tiny import save_tiny

DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense" \
               r"|intermediate\.dense|output\.dense)"
DEBERTA_TARGETS = r".*\.layer\.\d+\.(attention\.self\.(query|key|value)_proj" \
                  r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
TARGETS = {"bert": BERT_TARGETS, "deberta": DEBERTA_TARGETS}
TOL = 1e-5


def _pairs(n: int = 8) -> list[tuple[str, str]]:
    from megarank.config.schema import ASSETS

    records = read_triplets(ASSETS / "collections/cranfield/train_triplets.jsonl", 4)
    return [(r.query, d) for r in records for d in (r.pos[0], r.neg[0])][:n]


def _hf_scores(model: torch.nn.Module, collator, pairs, bert: bool) -> torch.Tensor:
    batch = collator.encode_pairs(pairs)
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if bert:
        kw["token_type_ids"] = batch.token_type_ids
    with torch.no_grad():
        return model.eval()(**kw).logits[:, 0].float()


def assert_exports_score_as_trained(run, base_dir, collator, pairs, trained, tmp_path):
    """The merged export (transformers) and the adapter export (PeftModel over the HF base) of a
    trained decoder run both score ``pairs`` as the run does, to TOL."""
    merged = megarank.convert_to_hf(run, tmp_path / "merged")
    torch.testing.assert_close(
        _hf_scores(AutoModelForSequenceClassification.from_pretrained(merged), collator, pairs,
                   False), trained, atol=TOL, rtol=0)
    adapter = megarank.convert_to_hf(run, tmp_path / "adapter", adapter=True)
    peft_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(_hf_scores(peft_model, collator, pairs, False), trained,
                               atol=TOL, rtol=0)


def _peft_adapter(base_dir, out, kind: str, dora: bool = False):
    """A PEFT LoRA (or DoRA) adapter on a tiny HF model with every A, B (q, k and v apart) and
    the head set to known non-zero values; DoRA's magnitudes scaled off ``||W + s B A||`` by
    factors in [0.25, 2.5], so its rescaling is not the identity."""
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    encoder = kind in TARGETS
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS.get(kind, DECODER_TARGETS),
                     task_type=TaskType.SEQ_CLS, use_dora=dora,
                     modules_to_save=["pooler"] if encoder else None)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.25 + 2.25 * torch.rand(p.shape, generator=g))  # x [0.25, 2.5]
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("kind", ["llama", "bert", "deberta"])
def test_peft_adapter_in_and_out_scores_as_peft(kind, tmp_path):
    base_dir = save_tiny(kind, tmp_path)
    peft_model = _peft_adapter(base_dir, tmp_path / "adapter", kind)
    pairs, bert = _pairs(), kind == "bert"

    ckpt = megarank.convert_from_hf(base_dir, tmp_path / "ckpt", adapter=tmp_path / "adapter")
    with megarank.load_scorer(ckpt) as scorer:
        ours = torch.tensor(scorer.score(pairs))
        collator = scorer.bundle.collator
        assert scorer.bundle.cfg.peft.rank == 4 and scorer.bundle.cfg.peft.alpha == 12
    theirs = _hf_scores(peft_model, collator, pairs, bert)
    base_only = _hf_scores(AutoModelForSequenceClassification.from_pretrained(base_dir),
                           collator, pairs, bert)
    assert (theirs - base_only).abs().max() > 0.05  # the adapter changes the scores
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    # The checkpoint holds adapters and head, not the frozen base.
    held = set(CheckpointTensors(ckpt))
    assert held and all(".lora." in n or n.startswith("head.") for n in held), sorted(held)[:5]

    # Back out: a PEFT adapter that PeftModel loads onto the base, and a merged model.
    adapter = megarank.convert_to_hf(ckpt, tmp_path / "out_adapter", adapter=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12
    again = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(_hf_scores(again, collator, pairs, bert), theirs, atol=TOL, rtol=0)
    merged = megarank.convert_to_hf(ckpt, tmp_path / "merged")
    merged_scores = _hf_scores(AutoModelForSequenceClassification.from_pretrained(merged),
                               collator, pairs, bert)
    torch.testing.assert_close(merged_scores, theirs, atol=TOL, rtol=0)


def _train(out, base_dir, steps: int, extra=()):
    return megarank.train_model([
        "model=hf", f"model.hf_path={base_dir}", "peft=lora", "peft.rank=4", "peft.alpha=8",
        "task=listwise", "task.group_size=4", f"trainer.max_steps={steps}",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_interval=1",
        "trainer.save_interval=0", "trainer.eval_interval=0", "trainer.eval_at_end=false",
        "trainer.progress_bar=false", "pair.max_length=64", "pair.max_query_length=16",
        "optim.lr=5e-3", "optim.weight_decay=0.0", "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0", f"trainer.output_dir={out}", *extra,
    ])


def test_trained_lora_exports_score_as_the_trained_model(tmp_path):
    base_dir = save_tiny("llama", tmp_path)
    run = tmp_path / "run"
    _train(run, base_dir, 6)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 6 and min(losses[3:]) < losses[0]
    pairs = _pairs()
    with megarank.load_scorer(run) as scorer:
        trained = torch.tensor(scorer.score(pairs))
        collator = scorer.bundle.collator
    base_scores = _hf_scores(AutoModelForSequenceClassification.from_pretrained(base_dir),
                             collator, pairs, False)
    assert (trained - base_scores).abs().max() > 1e-3  # training moved the scores

    assert_exports_score_as_trained(run, base_dir, collator, pairs, trained, tmp_path)


def test_lora_trains_only_adapters_and_head(tmp_path):
    # A base with no source elsewhere is saved with the run: its tensors must not move.
    common = ["model=gpt_tiny", "peft=lora", "peft.rank=4", "task.group_size=4",
              "trainer.max_steps=20", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
              "trainer.log_interval=1", "trainer.save_interval=10", "trainer.eval_interval=0",
              "trainer.eval_at_end=false", "trainer.progress_bar=false", "pair.max_length=48",
              "optim.lr=5e-3"]
    megarank.train_model([*common, "trainer.stop_at_step=0", f"trainer.output_dir={tmp_path / 'init'}"])
    megarank.train_model([*common, f"trainer.output_dir={tmp_path / 'run'}"])
    before = CheckpointTensors(tmp_path / "init" / "checkpoints" / "step_0000000")
    after = CheckpointTensors(tmp_path / "run" / "checkpoints" / "step_0000020")
    assert set(before) == set(after)
    moved = {n for n in after if not torch.equal(before[n], after[n])}
    assert moved == {n for n in after if ".lora.b" in n or ".lora.a" in n or n.startswith("head.")}
    frozen = [n for n in after if n not in moved]
    assert len(frozen) > 20 and "backbone.embedding.word_embeddings.weight" in frozen


def test_config_refusals():
    def problems(*overrides):
        with pytest.raises(ConfigError) as e:
            validate(compose(["peft=lora", *overrides]), 1)
        return str(e.value)

    assert "peft.targets: 'q_proj' is not a megatron linear" in problems("peft.targets=[q_proj]")
    assert "peft.rank (0) must be >= 1" in problems("peft.rank=0")
    assert "peft.dropout" in problems("peft.dropout=1.0")
    assert "peft.method" in problems("peft.method=ia3")
    assert "Transformer Engine" in problems("trainer.kernels=te")
    assert "names a linear twice" in problems("peft.targets=[linear_qkv,linear_qkv]")
    validate(compose(["peft=lora"]), 1)  # the preset itself is valid


def _adapter_grads(recompute: str) -> dict[str, torch.Tensor]:
    from megarank.bundle import build_bundle

    cfg = compose(["model=gpt_tiny", "peft=lora", "peft.rank=4", "trainer.device=cpu",
                   f"trainer.recompute={recompute}", "model.init_method_std=0.1"])
    with build_bundle(cfg, load_hf=False) as bundle:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in bundle.model.named_parameters():
                if ".lora.b" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        batch = bundle.collator.encode_pairs(_pairs(4))
        bundle.model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                    batch.pool_index).sum().backward()
        return {n: p.main_grad.clone() for n, p in bundle.model.named_parameters()
                if p.requires_grad}


def test_recompute_keeps_the_adapters_gradients():
    # Frozen embeddings give the first layer an input without gradient; megatron's activation
    # recompute must still run backward through the layers to reach the adapters.
    plain, recomputed = _adapter_grads("none"), _adapter_grads("full")
    assert len(plain) == 4 * 14 + 1  # 4 layers x (3 + 1 + 2 + 1) (A, B) pairs, + head
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-5)


def test_qlora_stores_the_base_4bit_and_trains(tmp_path):
    from megarank.bundle import build_bundle
    from megarank.models.lora import QuantizedWeight

    base_dir = save_tiny("llama", tmp_path)
    pairs = _pairs()
    scores, weight_bytes = {}, {}
    for method in ("lora", "qlora"):
        cfg = compose(["model=hf", f"model.hf_path={base_dir}", f"peft={method}",
                       "trainer.device=cpu", "pair.max_length=64", "pair.max_query_length=16"])
        from megarank.checkpoint.hf import apply_hf_config

        apply_hf_config(cfg)
        with build_bundle(cfg) as bundle:
            layers = bundle.model.module.backbone.decoder.layers
            linears = [getattr(getattr(layer, o), t) for layer in layers
                       for o, t in (("self_attention", "linear_qkv"), ("self_attention", "linear_proj"),
                                    ("mlp", "linear_fc1"), ("mlp", "linear_fc2"))]
            quantized = [isinstance(getattr(lin, "weight_4bit", None), QuantizedWeight)
                         for lin in linears]
            assert all(quantized) == (method == "qlora") and any(quantized) == all(quantized)
            weight_bytes[method] = sum(
                lin.weight_4bit.packed.numel() if method == "qlora"
                else lin.weight.numel() * lin.weight.element_size() for lin in linears)
            from megarank.api import Scorer

            scores[method] = torch.tensor(Scorer(bundle).score(pairs))
    # NF4 packs two weights a byte: 1/8 of fp32 (the block scales are kept apart).
    assert weight_bytes["qlora"] * 8 == weight_bytes["lora"]
    # The same model up to NF4's rounding: different scores, in nearly the same order.
    assert (scores["qlora"] - scores["lora"]).abs().max() > 0
    assert torch.corrcoef(torch.stack([scores["qlora"], scores["lora"]]))[0, 1] > 0.9

    run = tmp_path / "run"
    _train(run, base_dir, 8, extra=["peft.method=qlora"])
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 8 and min(losses[4:]) < losses[0], losses
    held = set(CheckpointTensors(run / "checkpoints" / "step_0000008"))
    assert held and all(".lora." in n or n.startswith("head.") for n in held)
    with megarank.load_scorer(run) as scorer:  # the base re-read and re-quantized, then adapters
        again = torch.tensor(scorer.score(pairs))
    assert (again - scores["qlora"]).abs().max() > 1e-4  # trained


def test_qwen3_reranker_lora_adapter_scores_as_peft(tmp_path):
    # The yes/no head (score = logit(yes) - logit(no) at the last token) with LoRA: the head is
    # the vocabulary and stays frozen; the adapter loads onto the HF causal LM.
    from transformers import AutoModelForCausalLM

    from tests.helpers.hf_tiny import save_qwen3_reranker

    base_dir = save_qwen3_reranker(tmp_path)
    run = tmp_path / "run"
    _train(run, base_dir, 4, extra=["pair=qwen3_reranker", "task.group_size=4",
                                    "pair.max_length=192", "pair.max_query_length=24"])
    pairs = _pairs(6)
    with megarank.load_scorer(run) as scorer:
        trained = torch.tensor(scorer.score(pairs))
        batch = scorer.bundle.collator.encode_pairs(pairs)
        yes, no = scorer.bundle.contract.yes_token_id, scorer.bundle.contract.no_token_id
    held = set(CheckpointTensors(run / "checkpoints" / "step_0000004"))
    assert held and all(".lora." in n for n in held)  # nothing of the head or vocabulary

    def yes_no(model):
        with torch.no_grad():
            logits = model.eval()(input_ids=batch.input_ids,
                                  attention_mask=batch.attention_mask).logits
        last = logits[torch.arange(len(pairs)), batch.pool_index]
        return (last[:, yes] - last[:, no]).float()

    base_scores = yes_no(AutoModelForCausalLM.from_pretrained(base_dir))
    assert (trained - base_scores).abs().max() > 1e-3
    adapter = megarank.convert_to_hf(run, tmp_path / "adapter", adapter=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    torch.testing.assert_close(yes_no(peft_model), trained, atol=TOL, rtol=0)
    merged = megarank.convert_to_hf(run, tmp_path / "merged")
    torch.testing.assert_close(yes_no(AutoModelForCausalLM.from_pretrained(merged)), trained,
                               atol=TOL, rtol=0)
