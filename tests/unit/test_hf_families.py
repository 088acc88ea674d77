"""The HF families beyond BERT/Llama/Qwen: what their configs map to, what is refused (by
model_type or field), and the config checks they bring. In process; the scores themselves are
compared with transformers in tests/parity."""

from __future__ import annotations

import shutil

import pytest
import torch

from megarank.checkpoint.hf import ConversionError, HFWeights, model_overrides_from_hf
from megarank.checkpoint.hf_mappings import rules_for
from megarank.config import ConfigError, compose, validate
from megarank.models.decoder import Llama3RopeScaling
from tests.helpers.hf_tiny import LLAMA3_ROPE, edit_config, make_config, save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: save_tiny(k, root) for k in ("xlm_roberta", "roberta", "llama3", "mistral")}


def _copy_with(src, dst, **changes):
    shutil.copytree(src, dst)
    return edit_config(dst, **changes)


def test_roberta_family_fields(models):
    for kind, mt in (("xlm_roberta", "xlm-roberta"), ("roberta", "roberta")):
        o = model_overrides_from_hf(models[kind])
        assert o["family"] == "bert" and o["hf_model_type"] == mt
        assert o["position_offset"] == 2 and o["encoder_head"] == "roberta"
        assert o["type_vocab_size"] == 1 and o["max_position_embeddings"] == 130
        cfg = compose(["model=hf", f"model.hf_path={models[kind]}"])
        for k, v in o.items():
            cfg.model[k] = v
        names = {r.hf[0] for r in rules_for(cfg.model)}
        assert "classifier.out_proj.weight" in names and "bert.pooler.dense.weight" not in names


def test_llama3_and_mistral_fields(models):
    o = model_overrides_from_hf(models["llama3"])
    assert o["rope_scaling"] == "llama3" and o["rotary_base"] == 5000.0
    assert (o["rope_scaling_factor"], o["rope_low_freq_factor"], o["rope_high_freq_factor"],
            o["rope_original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 64)
    m = model_overrides_from_hf(models["mistral"])
    assert m["hf_model_type"] == "mistral" and m["sliding_window"] == 128
    assert m["rope_scaling"] is None


def test_llama3_frequencies_equal_transformers():
    # The inverse frequencies themselves, in all three bands.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = make_config("llama3")
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (5000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ours = Llama3RopeScaling(8.0, 1.0, 4.0, 64)(plain)
    assert torch.equal(ours, theirs.float())
    kept, divided = ours == plain, torch.isclose(ours, plain / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any()


def test_old_style_rope_scaling_is_read(models, tmp_path):
    # Configs written before transformers 5: rope_theta + rope_scaling.
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    _copy_with(models["llama3"], tmp_path / "m", rope_parameters=None, rope_scaling=scaling,
               rope_theta=5000.0)
    o = model_overrides_from_hf(tmp_path / "m")
    assert o["rope_scaling"] == "llama3" and o["rope_original_max_position_embeddings"] == 64


@pytest.mark.parametrize("kind, changes, words", [
    ("llama3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     ["rope_type 'llama3' without low_freq_factor"]),
    ("llama3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}},
     ["rope scaling 'longrope'"]),
    ("llama3", {"partial_rotary_factor": 0.5}, ["partial_rotary_factor 0.5"]),
    ("mistral", {"attention_bias": True}, ["attention_bias"]),
    ("xlm_roberta", {"is_decoder": True}, ["is_decoder", "xlm-roberta"]),
    ("roberta", {"hidden_act": "relu"}, ["hidden_act 'relu'", "roberta"]),
    ("roberta", {"position_embedding_type": "relative_key"}, ["'relative_key'"]),
    ("xlm_roberta", {"pad_token_id": None}, ["pad_token_id", "xlm-roberta"]),
    ("xlm_roberta", {"model_type": "gemma"}, ["model_type 'gemma' is not supported"]),
    ("xlm_roberta", {"model_type": "modernbert"}, ["model_type 'modernbert' is not supported"]),
])
def test_refusals_name_the_field(models, tmp_path, kind, changes, words):
    path = _copy_with(models[kind], tmp_path / "m", **changes)
    with pytest.raises(ConversionError) as err:
        model_overrides_from_hf(tmp_path / "m")
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


def _cfg(hf_dir, *overrides):
    cfg = compose(["model=hf", f"model.hf_path={hf_dir}", *overrides])
    for k, v in model_overrides_from_hf(hf_dir).items():
        cfg.model[k] = v
    return cfg


def test_positions_after_the_offset_bound_max_length(models):
    validate(_cfg(models["xlm_roberta"], "pair.max_length=128"), 1)
    with pytest.raises(ConfigError) as err:
        validate(_cfg(models["xlm_roberta"], "pair.max_length=130"), 1)
    assert ("pair.max_length (130) must be <= model.max_position_embeddings (130) - "
            "model.position_offset (2)") in str(err.value)


def test_sliding_window_bounds_max_length(models):
    cfg = _cfg(models["mistral"], "pair.max_length=128")
    cfg.model.sliding_window = 64
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert "pair.max_length (128) must be <= model.sliding_window (64)" in str(err.value)


def test_headless_roberta_checkpoints_are_read(models, tmp_path):
    # XLMRobertaModel files from sentence-transformers carry no "roberta." prefix.
    from safetensors.torch import load_file, save_file

    d = tmp_path / "headless"
    shutil.copytree(models["xlm_roberta"], d)
    state = load_file(d / "model.safetensors")
    save_file({k.removeprefix("roberta."): v for k, v in state.items()
               if k.startswith("roberta.")}, d / "model.safetensors")
    w = HFWeights(d)
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    assert name in w and torch.equal(w.get(name), state[name])
    assert "classifier.dense.weight" not in w
