"""The run's metric record: per-step rates summed over a window of steps, written on rank 0 to
metrics.jsonl, a progress bar, and TensorBoard and Weights & Biases when enabled."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megarank.parallel.runtime import Runtime
from megarank.training.flops import mfu

logger = logging.getLogger("megarank")


def setup_logging(runtime: Runtime, level: str = "INFO") -> None:
    """Log INFO lines on rank 0 only; other ranks report warnings and errors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[megarank r{runtime.rank}] %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level if runtime.is_main else "WARNING")
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
    W&B (rank 0). Every number of a record becomes a scalar of the same name at its step.

    It also holds the `Window` of steps since the last logged one (on every rank: each returns
    the last record), so a step is accounted with `add_step` and its rates taken with
    `flush_window`."""

    def __init__(self, runtime: Runtime, output_dir: Path, total_steps: int, start_step: int,
                 progress_bar: bool, logging_cfg: Any | None = None,
                 run_config: dict | None = None, pairs_per_step: int = 0,
                 device_name: str | None = None):
        self.active = runtime.is_main
        self.bar = None
        self.wandb = None
        self.tensorboard = None
        if self.active:
            self._open(output_dir, total_steps, start_step, progress_bar, logging_cfg, run_config)
        # Started last: the first window's rates leave out opening the writers.
        self.window = Window(pairs_per_step, runtime.world_size, device_name)

    def _open(self, output_dir: Path, total_steps: int, start_step: int, progress_bar: bool,
              logging_cfg: Any | None, run_config: dict | None) -> None:
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

    def add_step(self, stats: dict[str, float], micro_batches: int, data_wait: float) -> None:
        """Account one step in the window (its reduced stats, this rank's micro-batches and the
        seconds it waited for them) and move the progress bar."""
        self.window.add(stats, micro_batches)
        self.window.data_wait += data_wait
        self.advance()

    def flush_window(self) -> dict[str, float]:
        """The window's mean loss, throughput and model FLOP rate; starts a new window."""
        return self.window.flush()

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


@dataclass
class Window:
    """Sums over the steps since the last logged one, turned into rates when logged."""

    pairs_per_step: int
    world_size: int = 1
    device_name: str | None = None
    steps: int = 0
    loss: float = 0.0
    real_tokens: float = 0.0
    padded_tokens: float = 0.0
    flops: float = 0.0
    data_wait: float = 0.0
    """Seconds the steps waited for their micro-batches (the background prefetch's misses)."""
    micro_batches: int = 0
    """This rank's micro-batches over the window (they vary with data.tokens_per_micro_batch)."""
    t0: float = field(default_factory=time.perf_counter)

    def add(self, stats: dict[str, float], micro_batches: int = 0) -> None:
        """Account one step's reduced stats and this rank's micro-batches in it."""
        self.steps += 1
        self.micro_batches += micro_batches
        self.loss += stats["loss"]
        self.real_tokens += stats["real_tokens"]
        self.padded_tokens += stats["padded_tokens"]
        self.flops += stats["flops"]

    def flush(self) -> dict[str, float]:
        """Mean loss, throughput and model FLOP rate of the window; starts a new one."""
        elapsed = time.perf_counter() - self.t0
        per_gpu = self.flops / elapsed / self.world_size
        out = {
            "loss": self.loss / self.steps,
            "pairs_per_s": self.pairs_per_step * self.steps / elapsed,
            "tokens_per_s": self.real_tokens / elapsed,
            "padded_tokens_per_s": self.padded_tokens / elapsed,
            "padding_fraction": 1.0 - self.real_tokens / max(self.padded_tokens, 1.0),
            "tflops_per_device": per_gpu / 1e12,
            "data_wait_s": self.data_wait / self.steps,
            "micro_batches": self.micro_batches / self.steps,
        }
        if self.device_name is not None:
            found = mfu(per_gpu, self.device_name)
            if found is not None:
                out["mfu"] = found[0]
        self.__init__(self.pairs_per_step, self.world_size, self.device_name)
        return out
