"""The 7B/8B experiment presets end to end at tiny scale, on the CPU, in one process.

Each preset runs as it ships (model=hf from a directory, its task and head, bf16, the
distributed optimizer, its optimizer and schedule) on a tiny random HF model of the same family
and head written here: Qwen3 causal LM with Qwen's chat tokenizer for ``qwen3_reranker_8b``
(yes/no head, untied as the 8B), Qwen2 and Llama with Llama-3 RoPE scaling for the
classifiers. Only what a 2-core CPU cannot run is overridden: the layout (tp1_pp1, no sequence
parallelism), the device, the batch and lengths, the steps. Each run imports the HF weights,
trains, stops and saves at step 2, resumes to step 4 (equal to an uninterrupted run), exports to
HF and scores pairs (megarank's scorer on the run and on the export, and transformers on the
export, agree).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import megarank
from megarank.config.schema import ASSETS
from megarank.data.triplets import read_triplets
from tests.helpers.hf_tiny import save_qwen3_reranker, save_tiny

TRIPLETS = ASSETS / "collections" / "cranfield" / "train_triplets.jsonl"
LR = 1e-4
STEPS = 4

# What a CPU needs instead of the presets' 16-GPU layout; everything else is the preset's.
CPU = ["parallel=tp1_pp1", "parallel.sequence_parallel=false", "trainer.device=cpu",
       "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "task.group_size=4",
       "pair.max_length=128", "pair.max_query_length=24", f"trainer.max_steps={STEPS}",
       "trainer.log_interval=1", "trainer.eval_at_end=false", "trainer.progress_bar=false",
       "trainer.save_interval=0", "optim.warmup_steps=0", f"optim.lr={LR}",
       f"data.train_path={TRIPLETS}"]


# preset -> (tiny model writer, overrides it needs: the chat prompt takes ~70 tokens)
MODELS = {
    "qwen3_reranker_8b": (lambda root: save_qwen3_reranker(root, tied=False),
                          ["pair.max_length=192"]),
    "qwen2p5_7b_classifier": (lambda root: save_tiny("qwen2", root), []),
    "llama3_8b_classifier": (lambda root: save_tiny("llama3", root), []),
}


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _pairs(n: int = 8) -> list[tuple[str, str]]:
    records = read_triplets(TRIPLETS, n)
    return [(r.query, d) for r in records for d in (r.pos[0], r.neg[0])][:n]


def _transformers_scores(export: Path, scorer, pairs, yes_no: bool) -> torch.Tensor:
    """transformers' scores of the export on the token ids megarank's collator writes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    batch = scorer.bundle.collator.encode_pairs(pairs)
    last = batch.attention_mask.sum(1) - 1
    rows = torch.arange(len(pairs))
    with torch.no_grad():
        if yes_no:
            model = AutoModelForCausalLM.from_pretrained(export).eval()
            logits = model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits[rows, last]
            c = scorer.bundle.contract
            return logits[:, c.yes_token_id] - logits[:, c.no_token_id]
        model = AutoModelForSequenceClassification.from_pretrained(export).eval()
        hidden = model.model(input_ids=batch.input_ids,
                             attention_mask=batch.attention_mask).last_hidden_state
        return model.score(hidden[rows, last])[:, 0]


@pytest.mark.parametrize("preset", sorted(MODELS))
def test_preset_imports_trains_resumes_exports_and_scores(preset, tmp_path):
    save, extra = MODELS[preset]
    hf = save(tmp_path)
    base = [f"experiment={preset}", f"model.hf_path={hf}", *CPU, *extra]

    # The preset's own choices survive the CPU overrides.
    cfg = megarank.compose_config(base)
    assert cfg.model.name == "hf" and cfg.trainer.precision == "bf16"
    assert cfg.parallel.use_distributed_optimizer and cfg.trainer.recompute == "none"
    yes_no = preset.startswith("qwen3_reranker")
    assert cfg.pair.head == ("yes_no" if yes_no else "classifier")

    full = tmp_path / "full"
    megarank.train_model([*base, f"trainer.output_dir={full}"])
    split = tmp_path / "split"
    megarank.train_model([*base, f"trainer.output_dir={split}", "trainer.stop_at_step=2"])
    assert (split / "checkpoints" / "latest").read_text().strip().endswith("2")
    megarank.train_model([*base, f"trainer.output_dir={split}", "trainer.resume=true"])
    ref, got = _losses(full), _losses(split)
    assert sorted(ref) == [1, 2, 3, 4] and len(set(ref.values())) > 1  # it trained
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-6), (preset, step, got, ref)

    export = megarank.convert_to_hf(split, tmp_path / "export")
    # The run started from the HF weights: 4 AdamW steps of lr 1e-4 (and bf16 rounding) move
    # no weight by more than ~1e-3; a fresh initialisation would be ~0.1 away.
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(hf / "model.safetensors", "pt") as a, \
            safe_open(export / "model.safetensors", "pt") as b:
        before, after = a.get_tensor(name), b.get_tensor(name)
    moved = float((after - before).abs().max())
    assert 0 < moved < 5e-3, (preset, moved, float(before.abs().max()))

    pairs = _pairs()
    with megarank.load_scorer(export, ["trainer.device=cpu"]) as scorer:
        assert scorer.bundle.contract.head == cfg.pair.head
        if yes_no:
            assert scorer.bundle.contract.pair_format == "chat"
        from_export = torch.tensor(scorer.score(pairs))
        theirs = _transformers_scores(export, scorer, pairs, yes_no)
    torch.testing.assert_close(theirs, from_export, atol=1e-4, rtol=0)
    with megarank.load_scorer(split, ["trainer.device=cpu", "trainer.precision=fp32"]) as scorer:
        from_run = torch.tensor(scorer.score(pairs))
    torch.testing.assert_close(from_run, from_export, atol=1e-5, rtol=0)
    assert from_export.std() > 0  # the pairs are told apart
