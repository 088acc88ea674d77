"""DeBERTa-v2/v3 (family deberta): HF config import and its refusals, the relative-position
buckets against transformers', the config checks, the plan's parameter count."""

from __future__ import annotations

import pytest
import torch

from megarank.checkpoint.hf import ConversionError, model_overrides_from_hf
from megarank.checkpoint.hf_mappings import rules_for
from megarank.config import ConfigError, compose, validate
from megarank.models.deberta import log_buckets
from tests.helpers.hf_tiny import edit_config, make_config


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny DeBERTa-v3 config.json (import reads only the config)."""
    d = tmp_path / "deberta"
    make_config("deberta").save_pretrained(d)
    return d


def test_v3_config_maps_fields(hf_dir):
    o = model_overrides_from_hf(hf_dir)
    assert o["family"] == "deberta" and o["hf_model_type"] == "deberta-v2"
    assert o["position_buckets"] == 8 and o["max_relative_positions"] == -1
    assert o["pos_att_type"] == ["p2c", "c2p"] and o["norm_rel_ebd"] == "layer_norm"
    assert not o["position_biased_input"] and o["type_vocab_size"] == 0
    assert o["encoder_head"] == "deberta" and o["layernorm_epsilon"] == 1e-7
    cfg = compose(["model=hf", f"model.hf_path={hf_dir}"])
    for k, v in o.items():
        cfg.model[k] = v
    validate(cfg, 1)
    names = {n for r in rules_for(cfg.model) for n in r.hf}
    assert {"deberta.encoder.rel_embeddings.weight", "deberta.encoder.LayerNorm.weight",
            "pooler.dense.weight", "classifier.weight"} <= names
    assert "deberta.encoder.layer.{i}.attention.self.query_proj.weight" in names


def test_unshared_position_projections_are_imported(hf_dir):
    edit_config(hf_dir, share_att_key=None)  # absent: DebertaV2Config's False
    assert model_overrides_from_hf(hf_dir)["share_att_key"] is False


def test_old_style_pos_att_type_string_is_read(hf_dir):
    edit_config(hf_dir, pos_att_type="p2c|c2p")
    assert model_overrides_from_hf(hf_dir)["pos_att_type"] == ["p2c", "c2p"]


@pytest.mark.parametrize("changes, words", [
    ({"relative_attention": False}, ["relative_attention false"]),
    ({"conv_kernel_size": 3}, ["conv_kernel_size 3"]),
    ({"pos_att_type": ["p2p", "c2p"]}, ["pos_att_type ['p2p', 'c2p']"]),
    ({"pos_att_type": "c2p|c2p"}, ["pos_att_type 'c2p|c2p'"]),
    ({"embedding_size": 32}, ["embedding_size 32"]),
    ({"pooler_hidden_size": 32}, ["pooler_hidden_size 32"]),
    ({"pooler_hidden_act": "tanh"}, ["pooler_hidden_act 'tanh'"]),
    ({"hidden_act": "relu"}, ["hidden_act 'relu'"]),
    ({"norm_rel_ebd": "batch_norm"}, ["norm_rel_ebd 'batch_norm'"]),
])
def test_unsupported_settings_are_refused_by_field(hf_dir, changes, words):
    path = edit_config(hf_dir, **changes)
    with pytest.raises(ConversionError) as err:
        model_overrides_from_hf(hf_dir)
    assert str(path) in str(err.value)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("buckets, max_position", [(8, 128), (256, 512), (16, 64), (4, 9)])
def test_log_buckets_equal_transformers(buckets, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = torch.arange(-3 * max_position, 3 * max_position + 1)
    ours = log_buckets(rel, buckets, max_position)
    theirs = make_log_bucket_position(rel, buckets, max_position).long()
    assert torch.equal(ours, theirs)
    # Exact near zero, logarithmic (fewer distinct values than distances) beyond.
    mid = buckets // 2
    assert torch.equal(ours[rel.abs() < mid], rel[rel.abs() < mid])
    assert ours.unique().numel() < rel.numel()


def _deberta(*overrides):
    return compose(["model=deberta_tiny", *overrides])


@pytest.mark.parametrize("overrides, field", [
    (["data.packing=true"], "data.packing is not supported for model.family deberta"),
    (["parallel=tp2_pp1", "parallel.sequence_parallel=true"],
     "parallel.sequence_parallel is not supported for model.family deberta"),
    (["model.pos_att_type=[c2p,p2p]"], "model.pos_att_type (['c2p', 'p2p'])"),
    (["model.norm_rel_ebd=batch_norm"], "model.norm_rel_ebd"),
    (["model.encoder_head=bert"], "model.encoder_head ('bert') must be 'deberta'"),
    (["model.position_embedding_type=learned_absolute"],
     "model.position_embedding_type ('learned_absolute') must be 'relative'"),
])
def test_config_refusals_name_the_field(overrides, field):
    validate(_deberta(), 1)
    world = 2 if any("tp2" in o for o in overrides) else 1
    with pytest.raises(ConfigError) as err:
        validate(_deberta(*overrides), world)
    assert field in str(err.value)


def test_plan_counts_the_relative_table_on_every_stage():
    from megarank.training.sizing.params import stage_params, total_params

    cfg = compose(["model=deberta_v3_base"])
    table = 2 * 256 * 768 + 2 * 768  # 512 relative embeddings and their LayerNorm
    layer = 4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    embeddings = 128128 * 768 + 2 * 768  # padded vocabulary, LayerNorm; no positions, types
    head = 768 * 768 + 768 + 768 + 1
    assert total_params(cfg) == 12 * layer + table + embeddings + head
    # microsoft/deberta-v3-base's DebertaV2Model: 184M with its 128,100-row vocabulary.
    assert 184e6 < total_params(cfg) - 28 * 768 < 185e6
    first, last = stage_params(cfg, 1, 2, 0), stage_params(cfg, 1, 2, 1)
    assert first == 6 * layer + table + embeddings and last == 6 * layer + table + head
    # Unshared: each layer adds pos_key_proj and pos_query_proj ([768, 768] + bias), split by TP.
    cfg.model.share_att_key = False
    assert total_params(cfg) == 12 * (layer + 2 * (768 * 768 + 768)) + table + embeddings + head
    assert stage_params(cfg, 2, 1, 0) - stage_params(compose(["model=deberta_v3_base"]), 2, 1, 0) \
        == 12 * (768 * 768 + 768)
