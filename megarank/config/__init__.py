"""Configuration: dataclass schema, Hydra registration, composition and validation."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from megarank.config.schema import register
from megarank.config.validate import ConfigError, Derived, validate

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"

__all__ = ["CONF_DIR", "ConfigError", "Derived", "compose", "register", "validate"]


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra ``overrides`` outside of ``@hydra.main``.

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
