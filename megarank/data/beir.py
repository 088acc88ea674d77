"""Readers and writers for BEIR-layout collections and TREC run files.

A collection folder holds ``corpus.jsonl`` (``{"_id", "title", "text"}``), ``queries.jsonl``
(``{"_id", "text"}``), ``qrels.tsv`` (``query-id<TAB>corpus-id<TAB>score`` after a header line) and
optionally ``split.json`` (``{"train": [qids], "test": [qids]}``).
See megarank/assets/collections/SOURCE.md.

Every parse error is a ValueError whose message starts with ``"{path}:{lineno}: "`` so that a bad
line can be found at once in a file of millions; a missing file is a FileNotFoundError.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megarank.data.ranking import Qrels, Run, rank_documents

_QRELS_HEADER = ["query-id", "corpus-id", "score"]


@dataclass
class Collection:
    """An in-memory BEIR collection."""

    corpus: dict[str, str]
    """docid -> document text as the reranker sees it (see ``document_text``)."""
    queries: dict[str, str]
    """qid -> query text."""
    qrels: Qrels
    """qid -> docid -> graded relevance, from qrels.tsv."""
    split: dict[str, list[str]] | None
    """split name -> qids, from split.json; None when the collection has no split.json."""
    root: Path
    """The folder the collection was read from."""

    def split_qids(self, name: str) -> list[str]:
        """Return the query ids of split ``name`` (e.g. ``"test"``); ValueError if there is none."""
        if self.split is None:
            raise ValueError(f"{self.root}: no split.json, so there is no split {name!r}")
        if name not in self.split:
            raise ValueError(
                f"{self.root / 'split.json'}: no split {name!r}; has {sorted(self.split)}"
            )
        return self.split[name]

    def split_qrels(self, name: str) -> Qrels:
        """Return the judgements of split ``name`` only: what the metrics should average over."""
        return {qid: self.qrels[qid] for qid in self.split_qids(name) if qid in self.qrels}


def document_text(title: str, text: str) -> str:
    """Join a document's title and text into the single string the reranker reads.

    ``"{title}. {text}"`` (a plain space when the title already ends in punctuation), the form
    train_triplets.jsonl uses, so training and evaluation see documents alike. The title is
    dropped when the text already starts with it: every Cranfield text repeats its title, and
    a repeat would only spend tokens.
    """
    title, text = title.strip(), text.strip()
    if not title or text.startswith(title):
        return text
    if not text:
        return title
    sep = " " if title[-1] in ".?!:;" else ". "
    return f"{title}{sep}{text}"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(lineno, object)`` for each non-blank line of a JSONL file."""
    _require_file(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


def _field(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}: missing {key!r}")
        return ""
    # BEIR ids are strings, but some exports write numeric ids as JSON numbers.
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _read_corpus(path: Path) -> dict[str, str]:
    corpus: dict[str, str] = {}
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        docid = _field(obj, "_id", where)
        if docid in corpus:
            raise ValueError(f"{where}: duplicate document id {docid!r}")
        text = _field(obj, "text", where)
        corpus[docid] = document_text(_field(obj, "title", where, required=False), text)
    return corpus


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        qid = _field(obj, "_id", where)
        if qid in queries:
            raise ValueError(f"{where}: duplicate query id {qid!r}")
        queries[qid] = _field(obj, "text", where).strip()
    return queries


def _read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> Qrels:
    _require_file(path)
    qrels: Qrels = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if (lineno == 1 and fields == _QRELS_HEADER) or not line.strip():
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 3:
                raise ValueError(f"{where}: expected 3 tab-separated fields, got {len(fields)}")
            qid, docid, score = fields
            try:
                rel = int(score)
            except ValueError:
                raise ValueError(f"{where}: non-integer relevance score {score!r}") from None
            # A judgement on an unknown id is a sign of mismatched files, not something to skip.
            if qid not in queries:
                raise ValueError(f"{where}: unknown query id {qid!r}")
            if docid not in corpus:
                raise ValueError(f"{where}: unknown document id {docid!r}")
            judged = qrels.setdefault(qid, {})
            if docid in judged:
                raise ValueError(f"{where}: duplicate judgement for ({qid!r}, {docid!r})")
            judged[docid] = rel
    return qrels


def _read_split(path: Path, queries: dict[str, str]) -> dict[str, list[str]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
    # The file is one JSON value, so structural errors can only point at its start.
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:1: expected an object of split name -> list of query ids")
    split: dict[str, list[str]] = {}
    for name, qids in obj.items():
        if not isinstance(qids, list) or not all(isinstance(q, str) for q in qids):
            raise ValueError(f"{path}:1: split {name!r} must be a list of query id strings")
        unknown = next((q for q in qids if q not in queries), None)
        if unknown is not None:
            raise ValueError(f"{path}:1: split {name!r} names unknown query id {unknown!r}")
        if len(set(qids)) != len(qids):
            raise ValueError(f"{path}:1: split {name!r} has duplicate query ids")
        split[name] = qids
    return split


def load_collection(root: str | Path) -> Collection:
    """Read a BEIR-layout collection folder, checking that qrels and split name known ids."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such collection folder")
    corpus = _read_corpus(root / "corpus.jsonl")
    queries = _read_queries(root / "queries.jsonl")
    qrels = _read_qrels(root / "qrels.tsv", queries, corpus)
    split_path = root / "split.json"
    split = _read_split(split_path, queries) if split_path.is_file() else None
    return Collection(corpus=corpus, queries=queries, qrels=qrels, split=split, root=root)


def read_trec_run(path: str | Path) -> Run:
    """Read a TREC run (``qid Q0 docid rank score tag``) into qid -> docid -> score.

    The rank column is ignored, as trec_eval does: order comes from the scores.
    Raises ValueError on a wrong field count, a non-numeric or non-finite score, or a docid
    listed twice for one query.
    """
    path = Path(path)
    _require_file(path)
    run: Run = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 6:
                raise ValueError(
                    f"{where}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}"
                )
            qid, _, docid, _, score_str, _ = fields
            try:
                score = float(score_str)
            except ValueError:
                raise ValueError(f"{where}: non-numeric score {score_str!r}") from None
            if not math.isfinite(score):
                raise ValueError(f"{where}: non-finite score {score_str!r}")
            scores = run.setdefault(qid, {})
            if docid in scores:
                raise ValueError(f"{where}: duplicate document id {docid!r} for query {qid!r}")
            scores[docid] = score
    return run


def write_trec_run(run: Run, path: str | Path, tag: str, qrels: Qrels | None = None) -> None:
    """Write ``run`` as a TREC run file, queries in ``run`` order, documents best first.

    Ranks follow ``rank_documents``, with ``qrels`` when given, so the rank column is the order
    the metrics measure (ties never favour a relevant document). Scores are written with
    ``repr`` so that ``read_trec_run`` gives back the same floats.
    """
    qrels = qrels or {}
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag must be non-empty without whitespace, got {tag!r}")
    lines = []
    for qid, scores in run.items():
        for rank, docid in enumerate(rank_documents(scores, qrels.get(qid)), start=1):
            if any(c.isspace() for c in qid + docid) or not qid or not docid:
                raise ValueError(f"ids must be non-empty without whitespace: ({qid!r}, {docid!r})")
            lines.append(f"{qid} Q0 {docid} {rank} {float(scores[docid])!r} {tag}\n")
    Path(path).write_text("".join(lines), encoding="utf-8")


def candidates(run: Run, qids: list[str], top_k: int) -> dict[str, list[str]]:
    """Return the ``top_k`` docids per query of a first-stage run, best first.

    A query absent from the run gets an empty list (it then scores 0 in ``mean_metrics``, as in
    ir-measures); use ``check_run_against`` to reject runs that miss queries by mistake.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return {qid: rank_documents(run.get(qid, {}))[:top_k] for qid in qids}


def check_run_against(collection: Collection, run: Run, run_path: str | Path) -> None:
    """Raise ValueError naming ``run_path`` and the first query or document id unknown to
    ``collection`` (in run order)."""
    for qid, scores in run.items():
        if qid not in collection.queries:
            raise ValueError(f"{run_path}: unknown query id {qid!r} (not in {collection.root})")
        for docid in scores:
            if docid not in collection.corpus:
                raise ValueError(
                    f"{run_path}: query {qid!r}: unknown document id {docid!r} "
                    f"(not in {collection.root})"
                )
