"""Round trip: HF -> megarank checkpoint imported in tp2_pp2 (4 ranks) -> HF is bitwise identical.
Also: the export loads on its own in transformers and scores as the original does.

The ten imports are the cases of one 4-rank launch; exports and the single-process imports run
in this process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.helpers.cases import cli_case, run_cases
from tests.helpers.hf_tiny import hf_inputs, random_batch, save_tiny
from tests.helpers.runs import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KINDS = [
    ("qwen3", False, "classifier"),
    ("bert", False, "classifier"),
    ("llama_tied", True, "yes_no"),
    ("qwen2", False, "classifier"),
    ("xlm_roberta", False, "classifier"),
    ("roberta", False, "classifier"),
    ("llama3", False, "classifier"),
    ("mistral", False, "classifier"),
    ("deberta", False, "classifier"),
    ("deberta_unshared", False, "classifier"),
]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """kind -> (HF source, its checkpoint imported in tp2_pp2): every import in one launch."""
    root = tmp_path_factory.mktemp("roundtrip")
    made = {kind: (save_tiny(kind, root / kind, causal_lm=causal_lm), root / kind / "ckpt")
            for kind, causal_lm, _ in KINDS}
    run_cases({kind: cli_case("megarank.convert", [
        "from-hf", "--hf", made[kind][0], "--out", made[kind][1], "parallel=tp2_pp2",
        f"pair.head={head}"]) for kind, _, head in KINDS}, nproc=4)
    return made


@pytest.mark.parametrize("kind, causal_lm, head", KINDS)
def test_hf_megarank_hf_is_bitwise(imported, kind, causal_lm, head, tmp_path):
    src, ckpt = imported[kind]
    meta = json.loads((ckpt / "megarank.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    assert json.loads((ckpt / "scoring.json").read_text())["head"] == head

    out = tmp_path / "export"
    run_cli("megarank.convert", ["to-hf", "--ckpt", ckpt, "--out", out])
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (out / "scoring.json").is_file() and (out / "tokenizer.json").is_file()

    cls = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    inputs = hf_inputs(kind, random_batch(kind=kind))
    with torch.no_grad():
        x = cls.from_pretrained(src)(**inputs).logits
        y = cls.from_pretrained(out)(**inputs).logits
    assert torch.equal(x, y)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == json.loads((src / "config.json").read_text())["model_type"]


def test_yes_no_exported_as_classifier_gives_identical_scores(tmp_path):
    src = save_tiny("qwen3", tmp_path, causal_lm=True)
    ckpt = tmp_path / "ckpt"
    run_cli("megarank.convert", ["from-hf", "--hf", src, "--out", ckpt, "pair.head=yes_no"])
    out = tmp_path / "cls"
    run_cli("megarank.convert", ["to-hf", "--ckpt", ckpt, "--out", out, "--as-classifier"])
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Qwen3ForSequenceClassification"]
    assert json.loads((out / "scoring.json").read_text())["head"] == "classifier"
    batch = random_batch()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    yes, no = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("yes", "no"))
    with torch.no_grad():
        lm = AutoModelForCausalLM.from_pretrained(src)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = lm[torch.arange(6), batch["last"]][:, yes] - lm[torch.arange(6), batch["last"]][:, no]
        got = AutoModelForSequenceClassification.from_pretrained(out)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_sharded_export_has_an_index_and_loads(tmp_path):
    src = save_tiny("llama", tmp_path)
    ckpt = tmp_path / "ckpt"
    run_cli("megarank.convert", ["from-hf", "--hf", src, "--out", ckpt])
    out = tmp_path / "sharded"
    run_cli("megarank.convert", ["to-hf", "--ckpt", ckpt, "--out", out, "--max-shard-mb", "2"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    original = load_file(src / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(original)
    exported = {}
    for shard in shards:
        exported.update(load_file(out / shard))
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    batch = random_batch()
    with torch.no_grad():
        a = AutoModelForSequenceClassification.from_pretrained(src)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = AutoModelForSequenceClassification.from_pretrained(out)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
