"""Fine-tuning a published reranker starts from it: a bge-reranker-style XLM-RoBERTa classifier
(RobertaClassificationHead: dense -> tanh -> out_proj on <s>) is imported with its head, survives
import -> export bitwise, and a 20-step fine-tune starts from the imported model's scores: its
first-step loss is the loss of transformers' scores on the same groups. In one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import megarank
from megarank.config.schema import ASSETS
from megarank.data.groups import GroupDataset
from megarank.data.sampler import GroupSampler
from megarank.data.triplets import read_triplets
from megarank.training.losses import group_loss
from tests.helpers.hf_tiny import save_tiny
from tests.helpers.pairs import pair_collator

TRIPLETS = ASSETS / "collections" / "cranfield" / "train_triplets.jsonl"
GROUP, GLOBAL, MICRO, MAX_LEN, MAX_Q = 4, 4, 2, 64, 16


@pytest.fixture(scope="module")
def bge(tmp_path_factory):
    """A tiny XLMRobertaForSequenceClassification with a trained-looking head: scores spread
    over several units (a random init gives near-equal scores, whose loss is ln(group size)
    from any head)."""
    path = save_tiny("xlm_roberta", tmp_path_factory.mktemp("bge"))
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.dense.weight.mul_(20.0)
        model.classifier.out_proj.weight.mul_(200.0)
    model.save_pretrained(path)
    return path


def _head_tensors(path):
    return {k: v for k, v in load_file(path / "model.safetensors").items()
            if k.startswith("classifier.")}


def test_head_survives_import_and_export_bitwise(bge, tmp_path):
    ckpt = megarank.convert_from_hf(bge, tmp_path / "ckpt")
    assert json.loads((ckpt / "scoring.json").read_text())["pooling"] == "cls"
    out = megarank.convert_to_hf(ckpt, tmp_path / "export")
    a, b = load_file(bge / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert sorted(_head_tensors(bge)) == ["classifier.dense.bias", "classifier.dense.weight",
                                          "classifier.out_proj.bias", "classifier.out_proj.weight"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["XLMRobertaForSequenceClassification"]
    assert config["model_type"] == "xlm-roberta" and config["pad_token_id"] == 1


def _first_step_groups():
    """The groups of step 1 of a one-process run (the sampler's first global batch)."""
    records = read_triplets(TRIPLETS)
    dataset = GroupDataset(records, GROUP, 1234)
    sampler = iter(GroupSampler(len(dataset), MICRO, 0, 1, 1234))
    return [[dataset[i, e] for i, e in next(sampler)] for _ in range(GLOBAL // MICRO)]


def _hf_loss(model, collator, micro_batches) -> float:
    """Step loss from transformers' scores: the listwise loss, mean over every group."""
    losses = []
    with torch.no_grad():
        for groups in micro_batches:
            b = collator(groups)
            scores = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, 0]
            losses.append(group_loss(scores.view(-1, GROUP), "listwise", 1.0, 1.0, None, 0.0,
                                     1.0).mean())
    return float(torch.stack(losses).mean())


def test_fine_tune_starts_from_the_imported_scores(bge, tmp_path):
    run = tmp_path / "run"
    megarank.train_model([
        "model=hf", f"model.hf_path={bge}", "task=listwise", f"task.group_size={GROUP}",
        "trainer.max_steps=20", f"trainer.global_batch_size={GLOBAL}",
        f"trainer.micro_batch_size={MICRO}", "trainer.log_interval=1", "trainer.eval_interval=0",
        "trainer.eval_at_end=false", "trainer.progress_bar=false", "trainer.save_interval=0",
        f"pair.max_length={MAX_LEN}", f"pair.max_query_length={MAX_Q}", "optim.lr=1e-3",
        "optim.warmup_steps=0", f"trainer.output_dir={run}", "trainer.device=cpu",
    ])
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 20

    tok = AutoTokenizer.from_pretrained(bge)
    collator = pair_collator(tok, "encoder", max_length=MAX_LEN, max_query_length=MAX_Q,
                            pad_to_multiple_of=8)
    hf = AutoModelForSequenceClassification.from_pretrained(bge).eval()
    micro = _first_step_groups()
    expected = _hf_loss(hf, collator, micro)
    assert losses[0] == pytest.approx(expected, abs=1e-5, rel=0)

    # A fresh head would start elsewhere: the check above sees the imported head.
    with torch.no_grad():
        for p in hf.classifier.parameters():
            p.normal_(0, 0.02)
    assert abs(_hf_loss(hf, collator, micro) - losses[0]) > 1e-3
    assert min(losses[-5:]) < losses[0]  # and it trains

    # The fine-tuned run exports as the same architecture, and transformers scores it as
    # megarank does.
    out = megarank.convert_to_hf(run, tmp_path / "export")
    assert sorted(_head_tensors(out)) == sorted(_head_tensors(bge))
    # Short enough that nothing is cut: the tokenizer's own pair encoding is the reference.
    pairs = [(" ".join(g.query.split()[:3]), " ".join(d.split()[:12]))
             for groups in micro for g in groups for d in g.docs][:8]
    assert all(len(tok(q, add_special_tokens=False)["input_ids"]) <= MAX_Q for q, _ in pairs)
    with megarank.load_scorer(run, ["trainer.device=cpu"]) as scorer:
        ours = torch.tensor(scorer.score(pairs))
    tuned = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] < MAX_LEN
    with torch.no_grad():
        theirs = tuned(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
