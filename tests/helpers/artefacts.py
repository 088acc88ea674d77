"""What the end-to-end tests build once and share (tests/e2e/conftest.py holds the fixtures):
the short bert_tiny run, ``megarank score`` in this process, torch's thread count for a while."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.helpers.runs import run_cli


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (as a one-process command gets), then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def short_run_overrides(out: Path, task: str = "listwise", lr: str = "1e-3",
                        save_final: bool = True) -> list[str]:
    """bert_tiny trained 6 steps on Cranfield's triplets (groups of 4, 64 tokens), evaluated on
    8 Cranfield test queries at steps 0, 3 and 6, every step logged."""
    return [
        "model=bert_tiny", f"task={task}", "data=cranfield", "task.group_size=4",
        "trainer.max_steps=6", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "trainer.log_interval=1", "trainer.save_interval=0",
        f"trainer.save_final={str(save_final).lower()}",
        "trainer.eval_interval=3", "trainer.eval_at_start=true",
        "trainer.progress_bar=false", "pair.max_length=64", "pair.max_query_length=16",
        "data.eval_top_k=5", "data.eval_max_queries=8", f"optim.lr={lr}",
        "optim.warmup_steps=0", f"trainer.output_dir={out}",
    ]


def train_in_process(overrides: Sequence[str], threads: int = 2) -> dict:
    """``megarank.train_model(overrides)`` here, with the threads a one-process run would use."""
    import megarank

    with torch_threads(threads):
        return megarank.train_model(list(overrides))


def score_pairs(model: Path, pairs: Sequence[tuple[str, str]], workdir: Path,
                *args: str) -> list[float]:
    """``megarank score --model MODEL [args]`` on ``pairs``, run in this process."""
    workdir.mkdir(parents=True, exist_ok=True)
    src, out = workdir / "pairs.jsonl", workdir / "scores.jsonl"
    src.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    with torch_threads(2):
        run_cli("megarank.score", ["--model", model, "--pairs", src, "--out", out, *args])
    return [json.loads(line)["score"] for line in out.read_text().splitlines()]
