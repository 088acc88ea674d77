"""Micro-batches made ahead, on a background thread, while the current step runs.

Collation is CPU work (token assembly, padding; tokenization for JSONL chat prompts) that would
otherwise sit on the step's critical path. numpy slicing, tensor building and the fast
tokenizer's Rust code release the GIL for most of that work, so a thread overlaps it with the
step's forward/backward. The loop asks `take_wait()` after each step: the seconds its
``next()`` calls waited for a batch, logged as ``data_wait_s``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """An iterator run `depth` items ahead on a daemon thread; depth 0 runs it in the caller.

    The items come in the source's order; an exception in the source is raised by the
    ``next()`` that reaches it.
    """

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        """Start the worker (when depth > 0)."""
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._source = source
        self.depth = depth
        self.wait_s = 0.0
        """Seconds ``next()`` waited since the last `take_wait`."""
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._run, name="megarank-prefetch",
                                            daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised by its next()
            self._put(_Failure(e))
            return
        self._put(_END)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            if self._thread is None:
                return next(self._source)
            item = self._queue.get()
        finally:
            self.wait_s += time.perf_counter() - t0
        if item is _END:
            self._queue.put(_END)  # every later next() ends too
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.error
        return item

    def take_wait(self) -> float:
        """The seconds waited for data since the last call; resets the count."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def close(self) -> None:
        """Stop the worker (it finishes the item it is making) and drop what it made."""
        self._stop.set()
        if self._thread is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)
