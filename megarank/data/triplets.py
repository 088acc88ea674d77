"""Reader for FlagEmbedding-style training triplets (JSONL).

One JSON object a line::

    {"query": str, "pos": [str, ...], "neg": [str, ...], "pos_scores": [...], "neg_scores": [...]}

`neg` may be missing (read as empty); the score lists are optional and kept for distillation;
an optional "instruction" (or FlagEmbedding's "prompt") string fills a chat prompt's
{instruction} (pair=qwen3_reranker); any other key ("type", ...) is ignored. Every problem is reported as
`DataFormatError("path:lineno: ...")`: a bad row is never dropped silently, because a silently
shorter training set shows up only as a worse model weeks later.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

_Fail = Callable[[str], NoReturn]


class DataFormatError(ValueError):
    """A triplet file that cannot be read; the message starts with ``"{path}:{lineno}: "``."""

    def __init__(self, path: str | Path, lineno: int, message: str) -> None:
        """Build the error for 1-based line `lineno` of `path`."""
        super().__init__(f"{path}:{lineno}: {message}")
        self.path = str(path)
        self.lineno = lineno


@dataclass(frozen=True)
class TripletRecord:
    """One training query with its positive and negative documents."""

    query: str
    """The query text (non-empty)."""
    pos: tuple[str, ...]
    """Relevant documents; at least one."""
    neg: tuple[str, ...]
    """Non-relevant (usually hard-mined) documents; may be empty."""
    pos_scores: tuple[float, ...] | None
    """Teacher scores for `pos` (same length), carried for distillation; None when absent."""
    neg_scores: tuple[float, ...] | None
    """Teacher scores for `neg` (same length); None when absent."""
    source: str
    """Where the record came from, ``"path:lineno"``, for error messages further down."""
    instruction: str | None = None
    """The record's "instruction" (or FlagEmbedding's "prompt"); None when absent."""


def _string_list(obj: dict[str, Any], key: str, fail: _Fail) -> tuple[str, ...]:
    """Return obj[key] as a tuple of strings, or call `fail` (which raises)."""
    value = obj[key]
    if not isinstance(value, list):
        fail(f"'{key}' must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            fail(f"'{key}[{i}]' must be a string, got {type(item).__name__}")
    return tuple(value)


def _scores(
    obj: dict[str, Any], key: str, expected_len: int, fail: _Fail
) -> tuple[float, ...] | None:
    """Return obj[key] as finite floats of length `expected_len`, None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        fail(f"'{key}' must be a list of numbers, got {type(value).__name__}")
    for i, item in enumerate(value):
        # bool is an int subclass; a true/false score is a data bug, not a 1.0/0.0.
        ok = isinstance(item, int | float) and not isinstance(item, bool)
        if not ok or not math.isfinite(item):
            fail(f"'{key}[{i}]' must be a finite number, got {item!r}")
    docs_key = key.removesuffix("_scores")
    if len(value) != expected_len:
        fail(f"'{key}' has {len(value)} entries but '{docs_key}' has {expected_len}")
    return tuple(float(v) for v in value)


def _instruction(obj: dict[str, Any], fail: _Fail) -> str | None:
    """obj["instruction"] (or FlagEmbedding's "prompt"), a string, or None when absent."""
    key = "instruction" if obj.get("instruction") is not None else "prompt"
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        fail(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _parse_record(obj: Any, path: Path, lineno: int) -> TripletRecord:
    """Validate one decoded JSON value and turn it into a TripletRecord."""

    def fail(message: str) -> NoReturn:
        raise DataFormatError(path, lineno, message)

    if not isinstance(obj, dict):
        fail(f"expected a JSON object, got {type(obj).__name__}")
    if "query" not in obj:
        fail("missing key 'query'")
    query = obj["query"]
    if not isinstance(query, str) or not query.strip():
        fail(f"'query' must be a non-empty string, got {query!r}")
    if "pos" not in obj:
        fail("missing key 'pos'")
    pos = _string_list(obj, "pos", fail)
    if not pos:
        fail("'pos' is empty: a training record needs at least one positive")
    neg = _string_list(obj, "neg", fail) if obj.get("neg") is not None else ()
    return TripletRecord(
        instruction=_instruction(obj, fail),
        query=query,
        pos=pos,
        neg=neg,
        pos_scores=_scores(obj, "pos_scores", len(pos), fail),
        neg_scores=_scores(obj, "neg_scores", len(neg), fail),
        source=f"{path}:{lineno}",
    )


def read_triplets(path: str | Path, max_records: int | None = None) -> list[TripletRecord]:
    """Read a FlagEmbedding JSONL triplet file; blank lines are skipped, anything else must parse.

    Args:
        path: the .jsonl file.
        max_records: stop after this many records (None reads the whole file).

    Raises:
        FileNotFoundError: `path` does not exist.
        DataFormatError: a malformed line or a file with no records (``"path:lineno: ..."``).
    """
    return list(iter_triplets(path, max_records))


def iter_triplets(path: str | Path, max_records: int | None = None,
                  on_line: Callable[[int], None] | None = None) -> Iterator[TripletRecord]:
    """The records of `read_triplets`, one at a time (a file of any size in constant memory).

    `on_line(nbytes)` is called after every line read (progress reporting). Errors are those of
    `read_triplets`, raised when the generator reaches the bad line.
    """
    path = Path(path)
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be >= 1 or None, got {max_records}")
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "triplet file not found", str(path))
    count = 0
    lineno = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if on_line is not None:
                on_line(len(raw))
            # Decode per line so that a bad byte is reported with its line number; utf-8-sig on
            # line 1 strips the BOM some Windows editors write.
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, lineno, f"not valid UTF-8 ({e.reason})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    path, lineno, f"malformed JSON: {e.msg} (column {e.colno})"
                ) from e
            yield _parse_record(obj, path, lineno)
            count += 1
            if max_records is not None and count >= max_records:
                return
    if not count:
        # Line 1 is where the first record was expected; keeps the "path:lineno: " contract.
        raise DataFormatError(path, 1, f"file holds no records ({lineno} lines, all blank)")


def read_pairs(path: str | Path) -> list[tuple[str, str]] | list[tuple[str, str, str | None]]:
    """(query, document) pairs from JSONL ``{"query", "document"}`` lines, with a third element,
    the line's "instruction" (None where absent), when any line has one; errors name the file
    and line."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                instruction = row.get("instruction")
                pair = (str(row["query"]), str(row["document"]))
                pairs.append(pair if instruction is None else (*pair, str(instruction)))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"query\", \"document\"}}: {e}") from e
    if any(len(p) == 3 for p in pairs):
        pairs = [p if len(p) == 3 else (*p, None) for p in pairs]
    return pairs
