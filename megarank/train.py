"""Entry point: ``python -m megarank.train`` or ``torchrun --nproc_per_node N -m megarank.train``.

Hydra composes megarank/conf/train.yaml with the command line's overrides
(``model=bert_tiny parallel=tp2_pp1 task=pairwise trainer.max_steps=50``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from megarank.config import CONF_DIR, register

register()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Train as configured (``megarank.train_model`` on the composed config)."""
    from megarank.api import train_model

    train_model(cfg)


# The guard matters: megatron's checkpoint saving starts processes with the `spawn` method, which
# re-imports __main__.
if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
