"""to-hf under torchrun: the ranks share the tensors and write the same HF directory, tensor for
tensor, as one process does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cases import cli_case, run_cases
from tests.helpers.runs import run_cli

pytestmark = pytest.mark.distributed


def _tensors(hf):
    index = hf / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for f in files:
        out.update(load_file(hf / f))
    return out, len(files)


def test_export_on_two_ranks_equals_one_process(tmp_path):
    import megarank

    run = tmp_path / "run"
    # A checkpoint to export, trained in this process; the exports then run here (one process)
    # and as the one case of a 2-rank launch.
    megarank.train_model(["model=gpt_tiny", "task=listwise", "pair.head=yes_no",
                          "task.group_size=2", "trainer.max_steps=2",
                          "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
                          "trainer.eval_at_end=false", "pair.max_length=32",
                          "pair.max_query_length=8", "data.max_records=4",
                          "trainer.progress_bar=false", f"trainer.output_dir={run}"])
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["to-hf", "--ckpt", run, "--max-shard-mb", "1"]
    run_cli("megarank.convert", [*args, "--out", one])
    run_cases({"to-hf": cli_case("megarank.convert", [*args, "--out", two])}, nproc=2)
    a, shards_a = _tensors(one)
    b, shards_b = _tensors(two)
    assert a.keys() == b.keys() and "lm_head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Each rank fills shards of its own (the last of each partly), so two ranks that shared the
    # work write one more shard than one process: 4 vs 3 for this model at 1 MB.
    assert shards_b > shards_a > 2, (shards_a, shards_b)
    for name in ("config.json", "scoring.json", "tokenizer.json"):
        assert (one / name).read_text() == (two / name).read_text(), name
    assert not list(tmp_path.glob("*.partial"))
    assert not list(two.glob("rank*"))  # every rank's shard got its HF name
