"""Rank-0 logging: a progress bar, metrics.jsonl, and Weights & Biases when enabled."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megarank.parallel.runtime import Runtime

logger = logging.getLogger("megarank")


def setup_logging(rt: Runtime, level: str = "INFO") -> None:
    """Log INFO lines on rank 0 only; other ranks report warnings and errors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[megarank r{rt.rank}] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level if rt.is_main else "WARNING")
    logger.propagate = False


def _drop_partial_line(path: Path) -> None:
    """A run killed mid-write (kill -9, a node lost) can leave half a JSON line at the end of
    metrics.jsonl; cut it off before a resumed run appends, so every line stays one record."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricsLog:
    """The run's metric record: one JSON object a line, a tqdm bar, and optional W&B (rank 0)."""

    def __init__(self, rt: Runtime, output_dir: Path, total_steps: int, start_step: int,
                 progress_bar: bool, wandb_cfg: Any | None = None, run_config: dict | None = None):
        self.active = rt.is_main
        self.bar = None
        self.wandb = None
        if not self.active:
            return
        path = output_dir / "metrics.jsonl"
        _drop_partial_line(path)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        if wandb_cfg is not None and wandb_cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs `pip install megarank[wandb]`") from e
            self.wandb = wandb.init(project=wandb_cfg.wandb_project, mode=wandb_cfg.wandb_mode,
                                    dir=str(output_dir), config=run_config)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``) to metrics.jsonl, the bar and W&B."""
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items()
                     if k in ("loss", "lr", "pairs_per_s", "tokens_per_s") or "@" in k}
            self.bar.set_postfix(shown, refresh=False)
        else:
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in record.items()))
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def write(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(f"[megarank] {message}", file=sys.stderr)
        else:
            logger.info(message)

    def close(self) -> None:
        """Flush and close everything."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
