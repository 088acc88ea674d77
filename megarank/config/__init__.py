"""Configuration: dataclass schema, Hydra registration, composition and validation."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from megarank.config.schema import ASSETS, package_path, register
from megarank.config.validate import (
    ENCODER_FAMILIES,
    ConfigError,
    Derived,
    check_mandatory,
    padded_vocab_size,
    validate,
)

# The Hydra config tree ships inside the package (package data), so an installed wheel has it too.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

__all__ = ["ASSETS", "CONF_DIR", "ENCODER_FAMILIES", "ConfigError", "Derived", "check_mandatory", "compose", "from_saved",
           "package_path", "padded_vocab_size", "register", "validate"]


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``megarank/conf/<config_name>.yaml`` with Hydra ``overrides`` outside of
    ``@hydra.main``.

    Used by tests, benchmarks and tools; the training entry point goes through ``hydra.main``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


# Fields older checkpoints may carry that the schema no longer has, and why they can be ignored.
REMOVED_FIELDS = {
    # The pooled token follows the family's HF architecture; scoring.json records it.
    "task": ("pooling",),
}

# Fields older checkpoints keep in another group: the pair format was spread over model, task
# and data before it became the ``pair`` group. (group, field) -> the pair field.
MOVED_TO_PAIR = {
    ("model", "prompt_template"): "template", ("task", "head"): "head",
    ("task", "yes_token"): "yes_token", ("task", "no_token"): "no_token",
    ("task", "prompt_prefix"): "prefix", ("task", "prompt_pair"): "template",
    ("task", "prompt_suffix"): "suffix", ("task", "instruction"): "instruction",
    ("data", "max_length"): "max_length", ("data", "max_query_length"): "max_query_length",
}


def _pair_of_old_config(saved: dict) -> dict:
    """The ``pair`` group of a config saved before it existed (empty for a newer one). A chat
    prompt's pair text wins over the plain decoder template, as it did."""
    pair: dict = {}
    chat = (saved.get("task") or {}).get("prompt_prefix") is not None
    for (group, name), field in MOVED_TO_PAIR.items():
        values = saved.get(group) or {}
        if name not in values:
            continue
        if field == "template" and (group == "model") == chat:
            continue
        pair[field] = values[name]
    return pair


def from_saved(saved: dict, overrides: list[str] | None = None) -> DictConfig:
    """A checkpoint's saved config, on top of today's schema defaults, with Hydra-style overrides.

    Fields added to the schema after the checkpoint was written take their defaults. A group
    override (``parallel=tp2_pp1``) replaces the whole group as composing would; dotted ones
    (``trainer.device=cpu``) set one value.
    """
    from omegaconf import OmegaConf

    cfg = compose([])
    if "pair" not in saved:
        saved = {**saved, "pair": _pair_of_old_config(saved)}
    for group, values in saved.items():
        if group in cfg:
            values = {k: v for k, v in values.items() if k not in REMOVED_FIELDS.get(group, ())
                      and (group, k) not in MOVED_TO_PAIR}
            cfg[group] = OmegaConf.merge(cfg[group], values)
    for item in overrides or []:
        key, _, value = item.partition("=")
        if "." not in key and key in cfg:
            cfg[key] = compose([item])[key]
        else:
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key),
                             merge=False)
    return cfg
