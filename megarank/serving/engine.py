"""The served model: a saved megarank model, scored as its contract says, behind the batcher.

The model comes from :func:`megarank.api.load_scorer` (a checkpoint, a run directory or an HF
export, its ``scoring.json`` checked against what its config would build, refused when they
disagree). Pairs are tokenized by the stage's pair collator and scored by
:func:`megarank.eval.scorer.score_batches`, the code ``megarank score`` and ``megarank evaluate``
run, so a served score is the score those commands give.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megarank.bundle import Scorer, build_collator, load_scorer
from megarank.data.batch import PairBatch
from megarank.errors import ArgumentError
from megarank.eval.scorer import score_batches
from megarank.parallel.env import env_world_size
from megarank.serving.batcher import DynamicBatcher

RELEVANCE = ("raw", "sigmoid")
"""What ``relevance_score`` reports: the model's raw score, or its sigmoid."""

PROBE = ("what is a boundary layer?", "The boundary layer is the thin layer of fluid near a wall.")


def default_threads() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one server accepts and how it batches."""

    max_batch_tokens: int = 16384
    """Padded tokens per forward pass (rows x width)."""
    max_wait_ms: float = 5.0
    """How long the first waiting request waits for others to share its forward pass."""
    max_documents: int = 1000
    """Documents per rerank request (pairs per score request)."""
    max_text_chars: int = 100_000
    """Characters per text (the query, each document): a longer one is refused, never cut at a
    character count (the scoring contract's token truncation still applies to what is taken)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Request body size."""


class RerankEngine:
    """A saved model, loaded once, scoring pairs through a :class:`DynamicBatcher`."""

    def __init__(self, scorer: Scorer, *, limits: ServeLimits = ServeLimits(),
                 max_length: int | None = None, relevance: str = "raw",
                 name: str | None = None, source: str | Path | None = None,
                 tokenizer_threads: int = 1) -> None:
        if relevance not in RELEVANCE:
            raise ArgumentError("{0} must be one of {choices}, got {value!r}", "relevance",
                                choices=", ".join(RELEVANCE), value=relevance)
        bundle = scorer.bundle
        self.scorer, self.bundle, self.limits, self.relevance = scorer, bundle, limits, relevance
        self.source = str(source) if source is not None else None
        self.name = name or (Path(source).resolve().name if source is not None else "megarank")
        contract = bundle.contract
        self.collator = bundle.collator
        if max_length is not None and max_length != contract.max_length:
            if max_length > contract.max_length:
                raise ArgumentError("{0} ({value}) is longer than the model's scoring contract "
                                    "allows ({limit})", "max_length", value=max_length,
                                    limit=contract.max_length)
            # A shorter cut, by the contract's own rule: query first, then the document.
            shorter = dataclasses.replace(contract, max_length=max_length)
            try:
                self.collator = build_collator(bundle.cfg, shorter, bundle.tokenizer)
            except ValueError as e:
                raise ArgumentError("{0} {value}: {reason}", "max_length", value=max_length,
                                    reason=str(e)) from e
        self.max_length = self.collator.max_length
        if limits.max_batch_tokens < self.max_length:
            raise ArgumentError("{0} ({value}) must hold one sequence of max length {length}",
                                "max_batch_tokens", value=limits.max_batch_tokens,
                                length=self.max_length)
        if limits.max_documents < 1:
            raise ArgumentError("{0} must be >= 1, got {value}", "max_documents",
                                value=limits.max_documents)
        if limits.max_text_chars < 1:
            raise ArgumentError("{0} must be >= 1, got {value}", "max_text_chars",
                                value=limits.max_text_chars)
        device = bundle.runtime.device

        def on_thread_start() -> None:
            if device.type == "cuda":
                torch.cuda.set_device(device)

        # FirstP, or MaxP (data.passages=max): every window of a document a row, its best
        # window's score the document's, as `megarank score` and `evaluate` score it.
        self.passages = bundle.cfg.data.passages
        encode = (self.collator.encode_pair_windows if self.passages == "max"
                  else self.collator.encode_pairs)
        self.batcher = DynamicBatcher(
            self._score, encode, pad_id=self.collator.pad_id,
            pad_to_multiple_of=self.collator.pad_to_multiple_of,
            max_batch_tokens=limits.max_batch_tokens, max_wait_ms=limits.max_wait_ms,
            tokenizer_threads=tokenizer_threads, on_thread_start=on_thread_start)

    @classmethod
    def load(cls, model: str | Path, overrides: Sequence[str] = (), *,
             device: str | None = None, **kwargs: Any) -> RerankEngine:
        """Load ``model`` (checkpoint, run directory or HF export) in this process, a world of
        one, and build its engine; the process group is shut down if that fails."""
        if env_world_size() != 1:
            raise RuntimeError("megarank serve runs the model in one process (not under "
                               "torchrun)")
        scorer = load_scorer(model, overrides, device=device)
        try:
            return cls(scorer, source=model, **kwargs)
        except BaseException:
            scorer.close()
            raise

    def _score(self, batch: PairBatch) -> torch.Tensor:
        return score_batches(self.bundle.model, self.bundle.runtime, [self.collator.model_layout(batch)])

    # ----------------------------------------------------------------------------- lifecycle
    def warm_up(self) -> list[float]:
        """Score one probe pair before serving (the first forward pass is the slow one)."""
        return self.batcher.score_now([PROBE])

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def close(self) -> None:
        """Stop the batcher and shut down the model's process group."""
        self.batcher.stop()
        self.scorer.close()

    # -------------------------------------------------------------------------------- scores
    async def score(self, pairs: list[tuple[str, str]],
                    relevance: str | None = None) -> tuple[list[float], int]:
        """(relevance scores of ``pairs`` in order, real tokens scored); ``relevance`` (raw or
        sigmoid) in place of the server's own, for a request shape that chooses it."""
        raw, tokens = await self.batcher.submit(pairs)
        if (relevance or self.relevance) == "sigmoid":
            return [sigmoid(s) for s in raw], tokens
        return raw, tokens

    def info(self) -> dict[str, Any]:
        """The model and the limits it is served with (start-up line, ``/health``)."""
        c = self.bundle.contract
        runtime = self.bundle.runtime
        return {
            "model": self.name, "source": self.source, "family": c.family, "head": c.head,
            "pooling": c.pooling, "passages": self.passages, "max_length": self.max_length,
            "contract_max_length": c.max_length, "max_query_length": c.max_query_length,
            "relevance_score": self.relevance, "device": str(runtime.device),
            "precision": str(self.bundle.cfg.trainer.precision),
            "threads": torch.get_num_threads(),
            "max_batch_tokens": self.limits.max_batch_tokens,
            "max_wait_ms": self.limits.max_wait_ms, "max_documents": self.limits.max_documents,
            "max_text_chars": self.limits.max_text_chars,
            "max_body_bytes": self.limits.max_body_bytes,
        }


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
