"""Parity with transformers: megarank models built from HF directories score a padded batch of
mixed lengths exactly as the HF models do (fp32, 1e-5), in tp1_pp1, tp2_pp1 and tp1_pp2: BERT,
XLM-RoBERTa and RoBERTa (positions offset by pad_token_id + 1, RobertaClassificationHead),
DeBERTa-v3 (disentangled attention over log-bucketed relative positions, ContextPooler; and with
position projections of their own, share_att_key false),
Llama, Llama with Llama 3 RoPE scaling, Mistral, Qwen2 and Qwen3.

tp1_pp1 scores in this process; the two 2-rank layouts are two cases of one torchrun launch, the
process group and megatron's parallel state rebuilt between them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers.cases import cli_case, run_cases
from tests.helpers.hf_tiny import hf_inputs, random_batch, save_tiny
from tests.helpers.runs import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CLASSIFIERS = ["bert", "llama", "qwen2", "qwen3", "xlm_roberta", "roberta", "llama3", "mistral",
               "deberta", "deberta_unshared"]
# The same DeBERTa weights without one of its position terms, its table's LayerNorm or its log
# buckets score otherwise: each matters well past the tolerance.
DEBERTA_OFF = [{"pos_att_type": ["p2c"]}, {"pos_att_type": ["c2p"]}, {"norm_rel_ebd": "none"},
               {"position_buckets": 8, "max_relative_positions": 16}]
YES_NO = ["qwen3", "llama_tied"]  # an untied and a tied LM head
LAYOUTS = {"tp1_pp1": 1, "tp2_pp1": 2, "tp1_pp2": 2}  # layout -> ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    batch = random_batch()
    batch_file = root / "batch.pt"
    torch.save(batch, batch_file)
    jobs, refs = [], []
    with torch.no_grad():
        for kind in CLASSIFIERS:
            d = save_tiny(kind, root)
            hf = AutoModelForSequenceClassification.from_pretrained(d).eval()
            kind_batch = random_batch(kind=kind)
            kind_file = root / f"batch_{kind}.pt"
            torch.save(kind_batch, kind_file)
            refs.append(hf(**hf_inputs(kind, kind_batch)).logits[:, 0])
            jobs.append(f"{d}|classifier|{kind_file}")
            if kind in ("xlm_roberta", "roberta"):
                # The offset matters: positions from 0 would score otherwise.
                plain = torch.arange(kind_batch["input_ids"].shape[1])[None]
                unshifted = hf(**hf_inputs(kind, kind_batch), position_ids=plain).logits[:, 0]
                assert (unshifted - refs[-1]).abs().max() > 1e-3, kind
            for change in DEBERTA_OFF if kind == "deberta" else []:
                other = AutoModelForSequenceClassification.from_pretrained(d, **change).eval()
                off = other(**hf_inputs(kind, kind_batch)).logits[:, 0]
                assert (off - refs[-1]).abs().max() > 1e-3, change
        # Same weights as the llama classifier (same seed and shapes): only the RoPE scaling
        # differs, and it changes the scores well past the tolerance.
        llama, llama3 = refs[CLASSIFIERS.index("llama")], refs[CLASSIFIERS.index("llama3")]
        assert (llama - llama3).abs().max() > 1e-4
        for kind in YES_NO:
            d = save_tiny(kind, root, causal_lm=True)
            tok = AutoTokenizer.from_pretrained(d)
            yes, no = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("yes", "no"))
            hf = AutoModelForCausalLM.from_pretrained(d).eval()
            logits = hf(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
            last = logits[torch.arange(len(batch["last"])), batch["last"]]
            refs.append(last[:, yes] - last[:, no])
            jobs.append(f"{d}|yes_no|{batch_file}")
    return root, jobs, refs


@pytest.fixture(scope="module")
def scores(setup):
    """layout -> rank 0's scores of every job: one process, then one 2-rank launch."""
    root, jobs, _ = setup
    out = {parallel: root / f"scores_{parallel}.pt" for parallel in LAYOUTS}
    worker = "tests.parity.score_worker"
    for parallel, nproc in LAYOUTS.items():
        if nproc == 1:
            run_cli(worker, [out[parallel], parallel, *jobs])
    run_cases({parallel: cli_case(worker, [out[parallel], parallel, *jobs])
               for parallel, nproc in LAYOUTS.items() if nproc == 2}, nproc=2)
    return {parallel: torch.load(path) for parallel, path in out.items()}


@pytest.mark.parametrize("parallel", list(LAYOUTS))
def test_scores_equal_transformers(setup, scores, parallel):
    _, _, refs = setup
    got = scores[parallel]
    names = [f"{k} classifier" for k in CLASSIFIERS] + [f"{k} yes/no" for k in YES_NO]
    for name, ours, theirs in zip(names, got, refs, strict=True):
        assert theirs.abs().max() > 1e-2, f"{name}: reference scores are trivially small"
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n} {parallel}: {m}")
