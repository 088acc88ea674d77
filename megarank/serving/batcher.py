"""Dynamic batching: requests that arrive together are scored together, by one scoring thread.

Each request's (query, document) pairs are tokenized by the model's pair collator on a small
tokenizer pool as soon as the request arrives, so the batcher knows every row's length in
tokens. Requests are numbered as they arrive and reach the scoring thread in that order, however
long each took to tokenize: none is overtaken by a later one. One scoring thread owns the model. It takes the oldest waiting request, then keeps
taking requests that arrive within ``max_wait_ms`` while their tokens fit ``max_batch_tokens``
(a request bigger than that alone is scored alone, in several forward passes). The rows of
those requests are sorted by length, longest first, and cut into forward passes of at most
``max_batch_tokens`` padded tokens, so short documents are not padded to long ones. Every row
remembers its request and its position: a request's scores come back in its own order and
never mix with another request's, and a request is answered once its last row is scored and
every earlier request of its group has been answered.

A forward pass that raises fails no request outright: each request that had rows in it is
scored again on its own, and only a request that fails alone gets the error. The event loop
never waits on the model: requests await an asyncio future that the scoring thread resolves.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from megarank.data.batch import PairBatch
from megarank.data.budget import gather_rows, length_passes
from megarank.data.truncation import max_over_windows

ScoreFn = Callable[[PairBatch], torch.Tensor]
"""Scores [N] (float32) of one batch of rows; the batcher calls it from the scoring thread."""
EncodeFn = Callable[[list[tuple[str, str]]], PairBatch]
"""(query, document) pairs -> their rows, in order (the model's pair collator); under MaxP a
pair's windows are its rows and the batch's ``windows`` says whose, and a pair's score is its
best window's."""


class ScoringError(RuntimeError):
    """The model failed on a request's rows, also when they were scored on their own."""


class BatcherStopped(RuntimeError):
    """The batcher no longer takes requests (the server is shutting down)."""


@dataclass(eq=False)
class _Request:
    batch: PairBatch
    """The request's rows as its collator padded them (to the request's longest row)."""
    lengths: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    scores: torch.Tensor = field(init=False)
    remaining: int = field(init=False)
    suspect: bool = False
    """A forward pass holding some of its rows failed: it is scored again on its own."""

    def __post_init__(self) -> None:
        self.scores = torch.zeros(len(self.lengths), dtype=torch.float32)
        self.remaining = len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        """Answer the awaiting coroutine from the scoring thread (ignored once it gave up)."""
        def done(fut: asyncio.Future = self.future) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(value)
        try:
            self.loop.call_soon_threadsafe(done)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


_STOP = object()


@dataclass
class BatchStats:
    """What the batcher has done since it started (reported by ``GET /health``)."""

    requests: int = 0
    pairs: int = 0
    forward_passes: int = 0
    max_requests_per_pass: int = 0
    """The most distinct requests whose rows shared one forward pass."""
    max_rows_per_pass: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    failed_passes: int = 0
    retried_requests: int = 0
    """Requests scored again on their own after a forward pass holding their rows failed."""
    failed_requests: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["padding_fraction"] = (round(1 - self.real_tokens / self.padded_tokens, 4)
                                 if self.padded_tokens else 0.0)
        return d


class DynamicBatcher:
    """Groups concurrent requests into token-bounded, length-sorted forward passes on one
    scoring thread. ``score_fn`` and ``encode_fn`` are the model's (see the module doc)."""

    def __init__(self, score_fn: ScoreFn, encode_fn: EncodeFn, *, pad_id: int,
                 pad_to_multiple_of: int = 1, max_batch_tokens: int = 16384,
                 max_wait_ms: float = 5.0, tokenizer_threads: int = 1,
                 on_thread_start: Callable[[], None] | None = None) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.score_fn = score_fn
        self.encode_fn = encode_fn
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._on_thread_start = on_thread_start
        self._queue: queue.Queue = queue.Queue()
        self._carry: _Request | None = None
        self._pool = ThreadPoolExecutor(max_workers=tokenizer_threads,
                                        thread_name_prefix="megarank-tokenize")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.in_flight = 0
        """Requests submitted and not yet answered."""
        self._arrivals = itertools.count()  # numbered on the event loop, in arrival order
        self._tokenized: dict[int, _Request | None] = {}
        self._next_arrival = 0

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the scoring thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="megarank-score", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Score what is queued, then stop the scoring thread and the tokenizer pool."""
        self._stopping = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------ requests
    async def submit(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        """(scores in the order of ``pairs``, real tokens scored) for one request."""
        if self._stopping or self._thread is None:
            raise BatcherStopped("the server is shutting down")
        loop = asyncio.get_running_loop()
        arrival = next(self._arrivals)
        queued = False
        with self._lock:
            self.in_flight += 1
        try:
            batch = await loop.run_in_executor(self._pool, self.encode_fn, pairs)
            lengths = batch.attention_mask.sum(dim=1).tolist()
            request = _Request(batch, lengths, loop, loop.create_future())
            self._enqueue(arrival, request)
            queued = True
            scores = await request.future
            return _per_pair(scores, batch).tolist(), request.tokens
        finally:
            if not queued:  # failed or cancelled before its turn: later ones must not wait
                self._enqueue(arrival, None)
            with self._lock:
                self.in_flight -= 1

    def _enqueue(self, arrival: int, request: _Request | None) -> None:
        """Queue tokenized requests in arrival order: ``request`` waits here until every
        earlier arrival is queued (or gave up, None)."""
        with self._lock:
            self._tokenized[arrival] = request
            while self._next_arrival in self._tokenized:
                ready = self._tokenized.pop(self._next_arrival)
                self._next_arrival += 1
                if ready is not None:
                    self._queue.put(ready)

    def score_now(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Score ``pairs`` on the calling thread, bypassing the queue (start-up warm-up; only
        before :meth:`start`)."""
        if self._thread is not None:
            raise RuntimeError("score_now runs only before the scoring thread starts")
        batch = self.encode_fn(pairs)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        out = torch.zeros(len(lengths), dtype=torch.float32)
        for rows in length_passes(lengths, max_tokens=self.max_batch_tokens,
                                  pad_multiple=self.pad_to_multiple_of):
            sub = self._gather([(batch, lengths, r) for r in rows])
            out[rows] = self.score_fn(sub).float()
        return _per_pair(out, batch).tolist()

    # --------------------------------------------------------------------------- the thread
    def _next(self, timeout: float | None) -> Any:
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        stop = False
        while not stop:
            first = self._next(None)
            if first is _STOP:
                break
            group, tokens = [first], first.tokens
            deadline = time.monotonic() + self.max_wait
            while tokens < self.max_batch_tokens:
                try:
                    nxt = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if tokens + nxt.tokens > self.max_batch_tokens:
                    self._carry = nxt  # first in the next group: arrival order is kept
                    break
                group.append(nxt)
                tokens += nxt.tokens
            self._score_safely(group)
        # Whatever is still queued is scored before the thread ends (graceful shutdown).
        rest = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                rest.append(item)
        for request in rest:
            self._score_safely([request])

    def _score_safely(self, group: list[_Request]) -> None:
        # The thread must outlive any error: a request it cannot answer gets the error.
        try:
            self._score_group(group)
        except Exception as e:
            for request in group:
                request.resolve(error=ScoringError(f"{type(e).__name__}: {e}"))

    def _score_group(self, group: list[_Request]) -> None:
        rows = [(request, r) for request in group for r in range(len(request.lengths))]
        lengths = [request.lengths[r] for request, r in rows]
        self.stats.requests += len(group)
        self.stats.pairs += len(rows)
        answered = 0  # group[:answered] have their scores: requests are answered in order

        def answer_finished() -> None:
            nonlocal answered
            while (answered < len(group) and group[answered].remaining == 0
                   and not group[answered].suspect):
                group[answered].resolve(group[answered].scores)
                answered += 1

        for pass_rows in length_passes(lengths, max_tokens=self.max_batch_tokens,
                                       pad_multiple=self.pad_to_multiple_of):
            members = [rows[i] for i in pass_rows]
            live = {id(req) for req, _ in members}
            try:
                scores = self._score_pass(members)
            except Exception:
                self.stats.failed_passes += 1
                for req, _ in members:
                    req.suspect = True
                continue
            self.stats.max_requests_per_pass = max(self.stats.max_requests_per_pass, len(live))
            for (req, r), s in zip(members, scores.tolist(), strict=True):
                req.scores[r] = s
                req.remaining -= 1
            answer_finished()
        for request in group[answered:]:
            if request.suspect:
                self._score_alone(request)
            else:
                request.resolve(request.scores)

    def _score_alone(self, request: _Request) -> None:
        """A request whose shared pass failed, scored on its own: its result or its error."""
        self.stats.retried_requests += 1
        try:
            for pass_rows in length_passes(request.lengths, max_tokens=self.max_batch_tokens,
                                           pad_multiple=self.pad_to_multiple_of):
                members = [(request, r) for r in pass_rows]
                request.scores[pass_rows] = self._score_pass(members)
        except Exception as e:
            self.stats.failed_requests += 1
            request.resolve(error=ScoringError(f"{type(e).__name__}: {e}"))
            return
        request.resolve(request.scores)

    def _score_pass(self, members: list[tuple[_Request, int]]) -> torch.Tensor:
        batch = self._gather([(req.batch, req.lengths, r) for req, r in members])
        scores = self.score_fn(batch).float().cpu()
        if scores.shape != (len(members),):
            raise RuntimeError(f"the model returned {tuple(scores.shape)} scores for "
                               f"{len(members)} rows")
        self.stats.forward_passes += 1
        self.stats.max_rows_per_pass = max(self.stats.max_rows_per_pass, len(members))
        self.stats.real_tokens += batch.num_real_tokens
        self.stats.padded_tokens += batch.input_ids.numel()
        return scores

    def _gather(self, rows: list[tuple[PairBatch, list[int], int]]) -> PairBatch:
        """One right-padded batch of rows taken from their requests' batches."""
        return gather_rows([(batch, r, lengths[r]) for batch, lengths, r in rows], self.pad_id,
                           self.pad_to_multiple_of)


def _per_pair(scores: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """A request's scores per pair from its rows' scores (MaxP: each pair's best window)."""
    return scores if batch.windows is None else max_over_windows(scores, batch.windows)
