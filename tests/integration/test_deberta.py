"""DeBERTa settings beyond v3's, in process: each position term alone, v2-style absolute
positions with token types and an unbucketed, clamped relative table, score like transformers;
a fresh deberta_tiny run exports a directory transformers scores as the run does.
(v3 itself, in tp1_pp1, tp2_pp1 and tp1_pp2: tests/parity/test_hf_parity.py.)"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

import megarank
from tests.helpers.hf_tiny import hf_inputs, random_batch, save_tiny
from tests.helpers.runs import run_cli
from tests.integration.test_lora import _hf_scores, _pairs

VARIANTS = {
    "c2p_only": {"pos_att_type": ["c2p"]},
    "p2c_only": {"pos_att_type": ["p2c"]},
    "unshared_c2p": {"share_att_key": False, "pos_att_type": ["c2p"]},
    # DeBERTa-v2 style: absolute positions and two token types in the input, no LayerNorm on
    # the relative table, distances exact up to +-16 and clamped beyond (rows reach 23 apart).
    "v2_style": {"position_biased_input": True, "type_vocab_size": 2, "norm_rel_ebd": "none",
                 "position_buckets": -1, "max_relative_positions": 16},
}


def test_variants_score_like_transformers(tmp_path):
    batch = random_batch(kind="deberta")
    # Two segments per row (the same lengths: random_batch draws them first).
    batch["token_type_ids"] = random_batch(kind="bert")["token_type_ids"]
    assert batch["token_type_ids"].any()
    torch.save(batch, tmp_path / "batch.pt")
    jobs, refs = [], []
    for name, changes in VARIANTS.items():
        d = save_tiny("deberta", tmp_path, changes=changes, name=name)
        hf = AutoModelForSequenceClassification.from_pretrained(d).eval()
        with torch.no_grad():
            refs.append(hf(**hf_inputs("deberta", batch),
                           token_type_ids=batch["token_type_ids"]).logits[:, 0])
        jobs.append(f"{d}|classifier|{tmp_path / 'batch.pt'}")
    run_cli("tests.parity.score_worker", [tmp_path / "scores.pt", "tp1_pp1", *jobs])
    for name, ours, theirs in zip(VARIANTS, torch.load(tmp_path / "scores.pt"), refs,
                                  strict=True):
        assert theirs.abs().max() > 1e-2, name
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_fresh_run_exports_as_transformers_scores_it(tmp_path):
    run = tmp_path / "run"
    megarank.train_model([
        "model=deberta_tiny", "task=listwise", "task.group_size=4", "trainer.max_steps=2",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_interval=0",
        "trainer.eval_at_end=false", "trainer.progress_bar=false", "pair.max_length=64",
        "model.init_method_std=0.1", "optim.lr=2e-3", f"trainer.output_dir={run}",
    ])
    pairs = _pairs()
    with megarank.load_scorer(run) as scorer:
        ours = torch.tensor(scorer.score(pairs))
        collator = scorer.bundle.collator
    out = megarank.convert_to_hf(run, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(hf).__name__ == "DebertaV2ForSequenceClassification"
    assert hf.config.position_buckets == 16 and not hf.config.position_biased_input
    assert ours.abs().max() > 1e-2
    torch.testing.assert_close(_hf_scores(hf, collator, pairs, False), ours, atol=1e-5, rtol=0)
