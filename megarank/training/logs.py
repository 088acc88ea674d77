"""Rank-0 logging: a progress bar, metrics.jsonl, and TensorBoard and Weights & Biases when
enabled."""

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


def _tensorboard_writer(output_dir: Path, start_step: int) -> Any:
    """A SummaryWriter on ``<output_dir>/tensorboard``. A resumed run purges what an earlier,
    interrupted attempt wrote after its checkpoint's step, so each step shows once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise ImportError("logging.tensorboard=true needs the tensorboard package "
                          "(`pip install tensorboard`)") from e
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                         purge_step=start_step + 1 if start_step > 0 else None)


class MetricsLog:
    """The run's metric record: one JSON object a line, a tqdm bar, and optional TensorBoard and
    W&B (rank 0). Every number of a record becomes a scalar of the same name at its step."""

    def __init__(self, rt: Runtime, output_dir: Path, total_steps: int, start_step: int,
                 progress_bar: bool, logging_cfg: Any | None = None,
                 run_config: dict | None = None):
        self.active = rt.is_main
        self.bar = None
        self.wandb = None
        self.tensorboard = None
        if not self.active:
            return
        path = output_dir / "metrics.jsonl"
        _drop_partial_line(path)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr)
        if logging_cfg is not None and logging_cfg.tensorboard:
            self.tensorboard = _tensorboard_writer(output_dir, start_step)
        if logging_cfg is not None and logging_cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb=true needs `pip install megarank[wandb]`") from e
            self.wandb = wandb.init(project=logging_cfg.wandb_project,
                                    mode=logging_cfg.wandb_mode, dir=str(output_dir),
                                    config=run_config)

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
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()  # a live `tensorboard --logdir` sees the step at once
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
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
