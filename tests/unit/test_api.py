"""The Python API alone, in one process: train a few steps, score pairs, convert both ways,
evaluate, and get the same scores from every form of the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import megarank
from megarank.data.triplets import read_triplets

CRANFIELD_TRIPLETS = "collections/cranfield/train_triplets.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """bert_tiny trained for 6 steps through megarank.train_model."""
    out = tmp_path_factory.mktemp("api") / "run"
    record = megarank.train_model([
        "model=bert_tiny", "task=listwise", "task.group_size=4", "trainer.max_steps=6",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_interval=1",
        "trainer.save_interval=0", "trainer.eval_interval=0", "trainer.eval_at_end=false",
        "trainer.progress_bar=false", "pair.max_length=64", "pair.max_query_length=16",
        "optim.lr=1e-3", "optim.warmup_steps=0", f"trainer.output_dir={out}",
    ])
    return out, record


def _pairs(n: int = 6) -> list[tuple[str, str]]:
    from megarank.config.schema import ASSETS

    records = read_triplets(ASSETS / CRANFIELD_TRIPLETS, 3)
    return [(r.query, d) for r in records for d in (r.pos[0], r.neg[0])][:n]


def test_train_score_convert_in_one_process(trained, tmp_path):
    out, record = trained
    assert record["step"] == 6 and torch.isfinite(torch.tensor(record["loss"]))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[0] != losses[-1]  # it trained: the loss moved
    pairs = _pairs()
    with megarank.load_scorer(out) as scorer:
        assert scorer.bundle.contract.pooling == "cls"
        from_run = scorer.score(pairs)
    assert len(from_run) == len(pairs) and len(set(from_run)) == len(pairs)

    hf = megarank.convert_to_hf(out, tmp_path / "hf")
    assert (hf / "model.safetensors").is_file() and (hf / "scoring.json").is_file()
    with megarank.load_scorer(hf) as scorer:
        from_hf = scorer.score(pairs)
    torch.testing.assert_close(torch.tensor(from_hf), torch.tensor(from_run), rtol=0, atol=1e-5)

    # and back: the export imported as a checkpoint scores the same
    ckpt = megarank.convert_from_hf(hf, tmp_path / "ckpt")
    with megarank.load_scorer(ckpt) as scorer:
        again = scorer.score(pairs)
    torch.testing.assert_close(torch.tensor(again), torch.tensor(from_run), rtol=0, atol=1e-5)

    # transformers agrees with the export (the classifier on BERT's pooled [CLS])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation="only_second",
              max_length=64, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**enc).logits[:, 0]
    torch.testing.assert_close(theirs, torch.tensor(from_run), rtol=0, atol=1e-4)


def test_evaluate_through_the_api(trained, tmp_path):
    from megarank.config.schema import ASSETS

    out, _ = trained
    result = megarank.evaluate_model(out, ASSETS / "collections/cranfield", top_k=5,
                                     out_dir=tmp_path / "eval")
    assert result["queries"]["evaluated"] > 0 and result["cross_check_max_abs_diff"] < 1e-9
    assert (tmp_path / "eval" / "run.megarank.trec").is_file()
    assert set(result["megarank"]) == set(result["first_stage"])


def test_a_contract_mismatch_is_refused_and_leaves_no_process_group(trained, tmp_path):
    import torch.distributed as dist

    out, _ = trained
    hf = megarank.convert_to_hf(out, tmp_path / "hf")
    contract = json.loads((hf / "scoring.json").read_text())
    contract["pooling"] = "last"  # a BERT classifier scores [CLS]: this is not how it scores
    (hf / "scoring.json").write_text(json.dumps(contract))
    with pytest.raises(ValueError, match="does not match how this model would score"):
        megarank.load_scorer(hf)
    assert not dist.is_initialized()


def test_an_argument_error_names_the_parameter_and_the_command_its_flag():
    from megarank.api import ArgumentError

    e = ArgumentError("{0} ({value!r}) must be positive, with {1}", "max_shard_mb", "dtype",
                      value="{-1}")
    assert str(e) == "max_shard_mb ('{-1}') must be positive, with dtype"
    assert e.as_flags() == "--max-shard-mb ('{-1}') must be positive, with --dtype"
    assert isinstance(e, ValueError)


def test_an_override_the_scoring_contract_decides_is_refused_not_replaced(trained, tmp_path):
    """pair.max_length=128 on a model saved at 64 was silently scored at 64 (the contract was
    written back into the config); now the config is checked against the contract, never
    overwritten by it, on every path that builds a saved model."""
    import torch.distributed as dist

    out, _ = trained
    hf = megarank.convert_to_hf(out, tmp_path / "hf")
    for model in (out, hf):
        with pytest.raises(ValueError, match=r"pair.max_length: the config gives max_length "
                                             r"128, scoring.json says 64"):
            megarank.load_scorer(model, ["pair.max_length=128"])
        assert not dist.is_initialized()
    with megarank.load_scorer(hf, ["pair.max_length=64", "pair.head=classifier"]) as scorer:
        assert scorer.bundle.contract.max_length == 64  # agreeing overrides are fine


def test_library_errors_name_parameters_not_command_line_flags():
    """Only command modules (cli.COMMANDS) speak of flags; the library raises ArgumentError with
    parameter names, which the commands translate (``for_command``)."""
    import ast
    import re

    import megarank
    from megarank.cli import COMMANDS

    root = Path(megarank.__file__).parent
    commands = {root / (m.split(".", 1)[1].replace(".", "/") + ".py") for m in COMMANDS.values()}
    commands.add(root / "cli.py")
    flag = re.compile(r"(^|[\s(`'])--[a-z][a-z0-9-]+")
    # A whole command line to run next (`megarank prepare --input ...`, torchrun's own flags)
    # is advice, not this call's parameters under another name.
    command_line = re.compile(r"`megarank \w|python -m megarank|torchrun")
    found = []
    for path in sorted(set(root.rglob("*.py")) - commands):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for const in ast.walk(node.exc):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                            and flag.search(const.value) \
                            and not command_line.search(const.value):
                        found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
    from megarank.api import for_command
    from megarank.eval.rerank import read_rerank_task

    with pytest.raises(ValueError) as err:
        read_rerank_task("unused", top_k=5, depth=2)
    assert str(err.value) == "depth (2) must be at least top_k (5)"
    assert for_command(err.value) == "--depth (2) must be at least --top-k (5)"
