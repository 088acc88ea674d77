"""Prepared datasets: every distinct query and document tokenized once, groups as index arrays.

``megarank prepare`` streams triplet JSONL files (megarank.data.triplets) into a directory of
numpy arrays, and training reads that directory memory-mapped::

    meta.json               format, the collator's token settings (tokenizer hash, lengths), the
                            sources, counts, and every file's size; written last
    query_tokens.bin        [Tq] query ids, no specials, cut to max_query_length (uint16/int32)
    query_offsets.npy       [Q + 1] int64: query q is query_tokens[off[q]:off[q + 1]]
    doc_tokens.bin          [Td] document ids, cut to max_length - the pair's special tokens
    doc_offsets.npy         [D + 1] int64
    group_query.npy         [G] uint32 query of each record
    pos_offsets.npy         [G + 1] int64 into pos_docs / pos_scores
    pos_docs.npy            [P] uint32 document of each positive, in record order
    pos_scores.npy          [P] float32 teacher scores (NaN where the record has none)
    neg_offsets.npy, neg_docs.npy, neg_scores.npy   the same for the negatives
    has_scores.npy          [G, 2] uint8: the record has pos_scores / neg_scores
    source_file.npy         [G] uint16 index into meta["sources"]; source_line.npy [G] int64

Documents are shared by many groups (mined negatives come from one corpus), so each distinct
text is stored once, found by a 16-byte BLAKE2 digest of its UTF-8 bytes while preparing.
Why numpy arrays and not Arrow or megatron's indexed dataset: the data is two token tables plus
a handful of fixed-width index arrays, which ``np.memmap`` / ``np.load(mmap_mode="r")`` open in
constant time and memory without a new dependency; every rank on a node maps the same files, so
the kernel's page cache holds one copy; and a group is read with a few slices. megatron's
``IndexedDataset`` stores one token table and would still need these index arrays beside it.

The JSONL path of training is a front of the same machinery: `load_jsonl` runs the builder into
memory instead of a directory, so both paths give the same groups, order and token ids.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import time
import uuid
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from megarank.data.batch import PairBatch
from megarank.data.collate import PairCollator
from megarank.data.groups import _warn_short_once, draw_group
from megarank.data.triplets import TripletRecord, iter_triplets

FORMAT = "megarank-prepared/1"
META = "meta.json"
_TOKENIZE_BATCH = 4096  # texts per batched tokenizer call: large enough to amortise the call

# Which config field each token setting comes from, for the mismatch message.
_SETTING_FIELDS = {
    "tokenizer_class": "model.tokenizer",
    "tokenizer_size": "model.tokenizer", "tokenizer_sha256": "model.tokenizer",
    "kind": "model.family", "template": "pair.template", "max_length": "pair.max_length",
    "max_query_length": "pair.max_query_length",
    "document_tokens": "pair.max_length (less the pair's special tokens), and "
                       "data.train_passages with data.passage_stride under data.passages=max",
}
# Settings recorded for information, never compared: where the tokenizer was read from. The same
# tokenizer files in another checkout, cache or mount give the same ids; what identifies the
# tokenizer is its content (tokenizer_class, tokenizer_size, tokenizer_sha256).
_INFORMATION_ONLY = ("tokenizer",)


class PreparedError(ValueError):
    """A prepared dataset that is incomplete, damaged, or made for another tokenizer/settings."""


@dataclass(frozen=True)
class TokenGroup:
    """A group of a prepared dataset: the ids of its query and documents (see groups.Group)."""

    query: int
    """Index of the query in the dataset's query table."""
    docs: tuple[int, ...]
    """group_size document indices: docs[0] the positive, docs[1:] the negatives."""
    record_index: int
    """The record (group) index."""
    teacher: tuple[float, ...] | None = None
    """Teacher scores of `docs` (float32 values), or None when the record has none."""


@dataclass
class PrepareStats:
    """What `prepare` read and wrote."""

    groups: int = 0
    documents_read: int = 0
    """Document occurrences in the records (positives + negatives)."""
    distinct_documents: int = 0
    distinct_queries: int = 0
    seconds: float = 0.0
    bytes_on_disk: int = 0


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class _TokenTable:
    """A growing table of token sequences (flat ids + offsets), in memory or streamed to a file."""

    def __init__(self, dtype: np.dtype, file: BinaryIO | None) -> None:
        self.dtype = dtype
        self.file = file
        self.ids = array("i") if file is None else None
        self.offsets = array("q", [0])

    def extend(self, seqs: list[list[int]]) -> None:
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
        for s in seqs:
            self.offsets.append(self.offsets[-1] + len(s))
        if self.file is not None:
            self.file.write(flat.astype(self.dtype).tobytes())
        else:
            self.ids.extend(flat.tolist())

    def array(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=self.dtype)


class _Texts:
    """Distinct texts of one kind, each given an index on first sight and tokenized once, in
    batches, in index order."""

    def __init__(self, tokenize: Any, table: _TokenTable) -> None:
        self.tokenize = tokenize
        self.table = table
        self.index: dict[bytes, int] = {}
        self.pending: list[str] = []

    def add(self, text: str) -> int:
        key = _digest(text)
        found = self.index.get(key)
        if found is None:
            found = self.index[key] = len(self.index)
            self.pending.append(text)
            if len(self.pending) >= _TOKENIZE_BATCH:
                self.flush()
        return found

    def flush(self) -> None:
        if self.pending:
            self.table.extend(self.tokenize(self.pending))
            self.pending = []


class _Builder:
    """Records -> the prepared arrays (see the module docstring), in memory or under `out`."""

    def __init__(self, collator: PairCollator, out: Path | None) -> None:
        if not collator.pretokenizable:
            raise PreparedError(
                "this model's chat prompt (pair=qwen3_reranker) tokenizes each (query, document) "
                "text whole, so texts cannot be tokenized once ahead; train it from the JSONL")
        self.settings = collator.token_settings()
        self.dtype = np.dtype(np.uint16 if self.settings["tokenizer_size"] <= 65536 else np.int32)
        self.out = out
        self._files = []

        def table(name: str) -> _TokenTable:
            file = None
            if out is not None:
                file = open(out / f"{name}_tokens.bin", "wb")  # noqa: SIM115 (closed in finish)
                self._files.append(file)
            return _TokenTable(self.dtype, file)

        self.queries = _Texts(collator.tokenize_queries, table("query"))
        self.docs = _Texts(collator.tokenize_documents, table("doc"))
        self.group_query = array("I")
        self.pos_offsets, self.neg_offsets = array("q", [0]), array("q", [0])
        self.pos_docs, self.neg_docs = array("I"), array("I")
        self.pos_scores, self.neg_scores = array("f"), array("f")
        self.has_scores = array("B")
        self.source_file = array("H")
        self.source_line = array("q")
        self.sources: list[str] = []
        self.documents_read = 0

    def add(self, record: TripletRecord, file_index: int, line: int) -> None:
        self.group_query.append(self.queries.add(record.query))
        for texts, scores, docs, offsets, values in (
                (record.pos, record.pos_scores, self.pos_docs, self.pos_offsets, self.pos_scores),
                (record.neg, record.neg_scores, self.neg_docs, self.neg_offsets, self.neg_scores)):
            docs.extend(self.docs.add(t) for t in texts)
            offsets.append(offsets[-1] + len(texts))
            values.extend(scores if scores is not None else [float("nan")] * len(texts))
        self.documents_read += len(record.pos) + len(record.neg)
        self.has_scores.append(record.pos_scores is not None)
        self.has_scores.append(record.neg_scores is not None)
        self.source_file.append(file_index)
        self.source_line.append(line)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every index array, by file stem (the token tables come separately)."""
        self.queries.flush()
        self.docs.flush()
        g = len(self.group_query)
        return {
            "query_offsets": np.asarray(self.queries.table.offsets, dtype=np.int64),
            "doc_offsets": np.asarray(self.docs.table.offsets, dtype=np.int64),
            "group_query": np.asarray(self.group_query, dtype=np.uint32),
            "pos_offsets": np.asarray(self.pos_offsets, dtype=np.int64),
            "pos_docs": np.asarray(self.pos_docs, dtype=np.uint32),
            "pos_scores": np.asarray(self.pos_scores, dtype=np.float32),
            "neg_offsets": np.asarray(self.neg_offsets, dtype=np.int64),
            "neg_docs": np.asarray(self.neg_docs, dtype=np.uint32),
            "neg_scores": np.asarray(self.neg_scores, dtype=np.float32),
            "has_scores": np.asarray(self.has_scores, dtype=np.uint8).reshape(g, 2),
            "source_file": np.asarray(self.source_file, dtype=np.uint16),
            "source_line": np.asarray(self.source_line, dtype=np.int64),
        }

    def close(self) -> None:
        for f in self._files:
            f.close()


class PreparedData:
    """A prepared dataset's arrays (memory-mapped from a directory, or in memory) and meta."""

    def __init__(self, arrays: dict[str, np.ndarray], query_tokens: np.ndarray,
                 doc_tokens: np.ndarray, meta: dict[str, Any], where: str) -> None:
        self.a = arrays
        self.query_tokens = query_tokens
        self.doc_tokens = doc_tokens
        self.meta = meta
        self.where = where
        """The directory, or the JSONL file it was built from."""
        self.num_groups = int(meta["groups"])

    def source(self, group: int) -> str:
        """``"path:line"`` of the record a group came from."""
        return f"{self.meta['sources'][int(self.a['source_file'][group])]}:" \
               f"{int(self.a['source_line'][group])}"

    def query(self, q: int) -> list[int]:
        """Token ids of query `q`."""
        off = self.a["query_offsets"]
        return self.query_tokens[off[q]:off[q + 1]].tolist()

    def doc(self, d: int) -> list[int]:
        """Token ids of document `d`."""
        off = self.a["doc_offsets"]
        return self.doc_tokens[off[d]:off[d + 1]].tolist()

    def check_settings(self, collator: PairCollator) -> None:
        """Refuse a collator that would tokenize differently from the one that prepared this."""
        if not collator.pretokenizable:
            raise PreparedError(
                f"{self.where}: a prepared dataset holds per-text token ids, but this model's "
                "chat prompt (pair=qwen3_reranker) tokenizes each pair whole; train it from JSONL")
        have, want = self.meta["settings"], collator.token_settings()
        differ = [k for k in want if k not in _INFORMATION_ONLY and have.get(k) != want[k]]
        diffs = [f"{k} (config field {_SETTING_FIELDS.get(k, k)}): prepared with {have.get(k)!r},"
                 f" this run has {want[k]!r}" for k in differ]
        if any(k.startswith("tokenizer") for k in differ):
            # Where each was read from, to find the files that differ; no difference itself.
            prepared_from, read_from = have.get("tokenizer"), want["tokenizer"]
            diffs.append(f"the tokenizer was read from {prepared_from!r} when prepared and from "
                         f"{read_from!r} by this run" if prepared_from != read_from else
                         f"the tokenizer at {read_from!r} has changed since it was prepared")
        if diffs:
            raise PreparedError(f"{self.where} was prepared for another tokenizer or truncation; "
                                "prepare it again for this model: " + "; ".join(diffs))


def _write_npy(path: Path, a: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, a)


def write_prepared(inputs: Sequence[str | Path], out: str | Path, collator: PairCollator,
            progress: bool = True) -> PrepareStats:
    """Stream triplet JSONL `inputs` (in order) into the prepared dataset directory `out`.

    The directory is built under a hidden temporary name next to `out` and renamed only once
    complete (meta.json, with every file's size, is written last), so an error or a kill never
    leaves anything at `out` that training could take for complete; on an error the temporary
    directory is removed.

    Raises:
        FileExistsError: `out` exists.
        DataFormatError: a malformed line (``"path:lineno: ..."``); nothing is written.
        PreparedError: the collator's layout cannot be prepared (chat prompts).
    """
    out = Path(out).resolve()
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another output directory")
    paths = [Path(p).resolve() for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"triplet file not found: {p}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    builder = None
    try:
        builder = _Builder(collator, tmp)
        bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
                   desc="prepare", disable=not progress, file=sys.stderr, mininterval=1.0)
        with bar:
            for i, path in enumerate(paths):
                builder.sources.append(str(path))
                for record in iter_triplets(path, on_line=bar.update):
                    builder.add(record, i, int(record.source.rsplit(":", 1)[1]))
                    if len(builder.group_query) % 10000 == 0:
                        rate = builder.documents_read / (time.perf_counter() - t0)
                        bar.set_postfix_str(f"{len(builder.group_query):,} groups, "
                                            f"{rate:,.0f} docs/s", refresh=False)
        arrays = builder.arrays()
        builder.close()
        for name, a in arrays.items():
            _write_npy(tmp / f"{name}.npy", a)
        meta = _meta(builder, arrays)
        meta["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.rename(tmp, out)
    except BaseException:
        if builder is not None:
            builder.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareStats(groups=meta["groups"], documents_read=builder.documents_read,
                        distinct_documents=meta["documents"], distinct_queries=meta["queries"],
                        seconds=time.perf_counter() - t0,
                        bytes_on_disk=sum(f.stat().st_size for f in out.iterdir()))


def _meta(builder: _Builder, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "settings": builder.settings,
        "token_dtype": builder.dtype.name,
        "groups": len(builder.group_query),
        "queries": len(arrays["query_offsets"]) - 1,
        "documents": len(arrays["doc_offsets"]) - 1,
        "query_tokens": int(arrays["query_offsets"][-1]),
        "doc_tokens": int(arrays["doc_offsets"][-1]),
        "sources": builder.sources,
    }


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a directory (a prepared dataset, complete or not)."""
    return Path(path).is_dir()


def open_prepared(path: str | Path) -> PreparedData:
    """Memory-map a prepared dataset; constant time and memory whatever its size.

    Raises:
        PreparedError: no meta.json (not a prepared dataset, or not complete), another format,
            or a file whose size differs from what meta.json records (truncated, replaced).
    """
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise PreparedError(f"{path} is not a complete prepared dataset (no {META}); build it "
                            "with `megarank prepare --input FILE.jsonl --out DIR model=...`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise PreparedError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for name, size in meta["files"].items():
        f = path / name
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            raise PreparedError(f"{f}: expected {size} bytes as {META} records, found "
                                f"{'no file' if actual is None else f'{actual} bytes'}")
    arrays = {f.stem: _random_access(np.load(f, mmap_mode="r"))
              for f in sorted(path.glob("*.npy"))}
    dtype = np.dtype(meta["token_dtype"])

    def tokens(name: str, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return _random_access(np.memmap(path / f"{name}_tokens.bin", dtype=dtype, mode="r",
                                        shape=(n,)))

    return PreparedData(arrays, tokens("query", meta["query_tokens"]),
                        tokens("doc", meta["doc_tokens"]), meta, str(path))


def _random_access(a: np.ndarray) -> np.ndarray:
    """Tell the kernel that `a`'s pages are read at random (groups come in a shuffled order),
    so a page fault on a file not yet in the page cache reads that page, not a read-ahead
    window of its neighbours that the next groups will not use."""
    m = getattr(a, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_RANDOM"):
        m.madvise(mmap.MADV_RANDOM)
    return a


def load_jsonl(path: str | Path, collator: PairCollator,
               max_records: int | None = None) -> PreparedData:
    """The JSONL front: a triplet file prepared in memory (what `prepare` would write)."""
    builder = _Builder(collator, None)
    builder.sources.append(str(path))
    for record in iter_triplets(path, max_records):
        builder.add(record, 0, int(record.source.rsplit(":", 1)[1]))
    arrays = builder.arrays()
    meta = _meta(builder, arrays)
    return PreparedData(arrays, builder.queries.table.array(), builder.docs.table.array(), meta,
                        str(path))


class TokenGroupDataset:
    """`dataset[index, epoch]` is that sample's TokenGroup; the same draw as groups.GroupDataset
    (groups.draw_group), so the same records give the same groups."""

    def __init__(self, data: PreparedData, group_size: int, seed: int,
                 max_records: int | None = None) -> None:
        """Check every group once (as groups.check_records does for records).

        Raises:
            ValueError: group_size < 1, seed < 0, or a record without negatives while
                group_size > 1 (naming its file and line).
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.data = data
        self.num_groups = data.num_groups if max_records is None else min(data.num_groups,
                                                                         max_records)
        self.group_size = group_size
        self.seed = seed
        need = group_size - 1
        self.num_short = 0
        if need:
            # [G] negatives per record; one pass over an 8-byte-per-record array.
            counts = np.diff(data.a["neg_offsets"][: self.num_groups + 1])
            empty = np.flatnonzero(counts == 0)
            if empty.size:
                raise ValueError(f"{data.source(int(empty[0]))}: record has no negatives, cannot "
                                 f"form a group of group_size={group_size}")
            self.num_short = int((counts < need).sum())
            if self.num_short:
                _warn_short_once(
                    f"{self.num_short} of {self.num_groups} records have fewer than group_size "
                    f"- 1 = {need} negatives; their negatives are sampled with replacement")

    def first_without_teacher(self) -> str | None:
        """``"path:line"`` of the first record without teacher scores, or None when all have
        them (the rule of groups.make_group: pos_scores, and neg_scores unless group_size 1)."""
        has = self.data.a["has_scores"][: self.num_groups]
        ok = has[:, 0].astype(bool)
        if self.group_size > 1:
            ok &= has[:, 1].astype(bool)
        bad = np.flatnonzero(~ok)
        return self.data.source(int(bad[0])) if bad.size else None

    def __len__(self) -> int:
        """Number of records (= groups per epoch)."""
        return self.num_groups

    def __getitem__(self, key: tuple[int, int]) -> TokenGroup:
        """The group of record `index` in `epoch`; key = (index, epoch) as the sampler yields."""
        index, epoch = key
        a = self.data.a
        p0, p1 = int(a["pos_offsets"][index]), int(a["pos_offsets"][index + 1])
        n0, n1 = int(a["neg_offsets"][index]), int(a["neg_offsets"][index + 1])
        p, picked = draw_group(p1 - p0, n1 - n0, index, self.group_size, self.seed, epoch)
        docs = (int(a["pos_docs"][p0 + p]), *(int(a["neg_docs"][n0 + i]) for i in picked))
        teacher = None
        has = a["has_scores"][index]
        if has[0] and (has[1] or self.group_size == 1):
            teacher = (float(a["pos_scores"][p0 + p]),
                       *(float(a["neg_scores"][n0 + i]) for i in picked))
        return TokenGroup(int(a["group_query"][index]), docs, index, teacher)


def collate_token_groups(collator: PairCollator, data: PreparedData,
                         groups: Iterable[TokenGroup]) -> PairBatch:
    """One micro-batch of token groups, assembled as `PairCollator.__call__` assembles text."""
    groups = list(groups)
    size = len(groups[0].docs)
    query_ids = [data.query(g.query) for g in groups]
    doc_ids = [data.doc(d) for g in groups for d in g.docs]
    query_of_row = [i for i in range(len(groups)) for _ in range(size)]
    teacher = None
    if all(g.teacher is not None for g in groups):
        teacher = [s for g in groups for s in g.teacher]
    if collator.train_windows > 1:  # MaxP: each document read as its first windows
        return collator.encode_windows(query_ids, doc_ids, query_of_row, size, teacher,
                                       collator.train_windows)
    return collator.encode_tokens(query_ids, doc_ids, query_of_row, size, teacher)
