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


def from_saved(saved: dict, overrides: list[str] | None = None) -> DictConfig:
    """A checkpoint's saved config, on top of today's schema defaults, with Hydra-style overrides.

    Fields added to the schema after the checkpoint was written take their defaults. A group
    override (``parallel=tp2_pp1``) replaces the whole group as composing would; dotted ones
    (``trainer.device=cpu``) set one value.
    """
    from omegaconf import OmegaConf

    cfg = compose([])
    for group, values in saved.items():
        if group in cfg:
            values = {k: v for k, v in values.items() if k not in REMOVED_FIELDS.get(group, ())}
            cfg[group] = OmegaConf.merge(cfg[group], values)
    for item in overrides or []:
        key, _, value = item.partition("=")
        if "." not in key and key in cfg:
            cfg[key] = compose([item])[key]
        else:
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key),
                             merge=False)
    return cfg
