"""Conversion refuses what it cannot represent exactly, with messages that say what and where."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from megarank.checkpoint.hf import ConversionError, HFWeights, model_overrides_from_hf
from tests.helpers.hf_tiny import save_tiny


def _edit_config(d, **changes):
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("hf"))


def test_supported_config_maps_fields(llama):
    o = model_overrides_from_hf(llama)
    assert o["family"] == "gpt" and o["num_query_groups"] == 2 and o["rotary_base"] == 5000.0
    assert o["hf_model_type"] == "llama" and not o["add_qkv_bias"]


@pytest.mark.parametrize("changes, words", [
    ({"model_type": "gpt2"}, ["model_type 'gpt2' is not supported"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}},
     ["rope scaling 'yarn'"]),
    ({"hidden_act": "gelu_pytorch_tanh"}, ["hidden_act 'gelu_pytorch_tanh'"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"mlp_bias": True}, ["mlp_bias"]),
])
def test_unsupported_configs_are_refused(llama, tmp_path, changes, words):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama, d)
    path = _edit_config(d, **changes)
    with pytest.raises(ConversionError) as err:
        model_overrides_from_hf(d)
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_pickled_weights_load_only_tensors(tmp_path):
    # A pytorch_model.bin is read with weights_only=True: arbitrary objects are refused.
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(pickle.UnpicklingError):
        HFWeights(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(HFWeights(tmp_path).get("w"), torch.ones(2))


def test_shapes_that_disagree_with_the_config_are_refused(llama, tmp_path):
    # config.json claims a wider MLP than the weights have.
    import shutil

    from megarank.bundle import build_bundle
    from megarank.config import compose
    from megarank.parallel.runtime import shutdown

    d = tmp_path / "m"
    shutil.copytree(llama, d)
    _edit_config(d, intermediate_size=128)
    cfg = compose(["model=hf", f"model.hf_path={d}"])
    try:
        with pytest.raises(ConversionError) as err:
            build_bundle(cfg, device="cpu")
        msg = str(err.value)
        assert "mlp.gate_proj.weight" in msg and "(256, 64)" in msg and "(192, 64)" in msg
    finally:
        shutdown()  # build_bundle shuts down on error; a second call is harmless
