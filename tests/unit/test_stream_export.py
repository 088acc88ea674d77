"""The streaming export: a checkpoint's tensors read one at a time equal the built model's, and
to-hf writes size-bounded shards (and casts) without building the model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import megarank
from megarank.api import ArgumentError
from megarank.checkpoint.stream import CheckpointTensors
from megarank.config import compose


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A gpt_tiny yes/no checkpoint (untied output layer) after 2 steps."""
    out = tmp_path_factory.mktemp("stream") / "run"
    megarank.train_model([
        "model=gpt_tiny", "task=listwise", "pair.head=yes_no", "task.group_size=2",
        "trainer.max_steps=2", "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
        "trainer.eval_at_end=false", "trainer.progress_bar=false", "pair.max_length=32",
        "pair.max_query_length=8", "data.max_records=4", f"trainer.output_dir={out}"])
    return out


def test_tensors_read_one_at_a_time_equal_the_model(checkpoint):
    from megarank.checkpoint.sharded import resolve_checkpoint

    lazy = CheckpointTensors(resolve_checkpoint(checkpoint))
    with megarank.load_scorer(checkpoint) as scorer:
        params = dict(scorer.bundle.model.module.named_parameters())
        assert sorted(lazy) == sorted(params)
        for name, p in params.items():
            assert torch.equal(lazy[name], p.detach()), name
    assert compose(["model=gpt_tiny"]).model.num_layers == sum(
        1 for n in lazy if n.endswith("mlp.linear_fc1.weight"))


def test_export_writes_bounded_shards_and_casts(checkpoint, tmp_path):
    one = megarank.convert_to_hf(checkpoint, tmp_path / "one")
    many = megarank.convert_to_hf(checkpoint, tmp_path / "many", max_shard_mb=1)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    whole = load_file(one / "model.safetensors")
    parts = {}
    for f in files:
        shard = load_file(many / f)
        # no shard above 1 MB unless it holds a single tensor bigger than that
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 2**20 or len(shard) == 1
        parts.update(shard)
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    assert json.loads((one / "config.json").read_text())["torch_dtype"] == "float32"

    half = megarank.convert_to_hf(checkpoint, tmp_path / "bf16", dtype="bf16")
    cast = load_file(half / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in cast.values())
    assert all(torch.equal(cast[k], whole[k].to(torch.bfloat16)) for k in whole)
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ArgumentError, match=r"^dtype \('int8'\) must be one of fp32, bf16"):
        megarank.convert_to_hf(checkpoint, tmp_path / "x", dtype="int8")
