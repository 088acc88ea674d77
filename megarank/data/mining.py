"""Mining training triplets with hard negatives from a BEIR collection (``megarank mine``).

For each judged query of the split (every judged query when there is no split.json), the
positives are its documents judged relevant (rel >= 1), most relevant first. Candidates are the
BM25 top ``depth`` (bm25s, k1=0.9, b=0.4, English stop words, no stemming: the settings of the
shipped run.bm25.trec files), or those candidates re-sorted by a megarank model's scores
(``--retriever model``, under torchrun in any layout) or by the cosine similarity of a
sentence-transformers embedding model (``--retriever dense``, as FlagEmbedding mines with an
embedder). Then, in rank order:

1. the first ``skip-top`` candidates are dropped (the top of a strong retriever is where the
   unjudged relevant documents hide);
2. every judged positive, and any document whose text equals a positive's, is dropped;
3. with ``--margin m``, so is every candidate scoring above (lowest positive's score - m): a
   false-negative guard in the spirit of FlagEmbedding's hn_mine and NV-Retriever's
   TopK-MarginPos;
4. ``negatives`` of what is left are drawn without replacement by a numpy Generator seeded from
   ``(seed, query id)``, so one query's draw does not depend on the others, and kept in rank order.

**Pseudo-queries** (``pseudo=N``, ``--pseudo-queries N``; needs a teacher, i.e. the model
or dense retriever): ~150 judged training queries are few, and the corpus holds thousands of
unjudged documents. N documents are drawn (seeded), and each one's first sentence (its title, in a
titled collection) becomes a query, the inverse-cloze way. The source document itself is left out
of its candidates, since it contains its own title and would teach nothing but copying. The
teacher's best remaining candidate is the positive, and the negatives are drawn from the rest as
above, all with the teacher's scores: the GPL recipe (a teacher labels in-domain pseudo-queries)
with the title as the query generator. Only documents are read, never the collection's queries or
judgements, so every split's queries stay unseen.

**A fused teacher** (``fuse_bm25=w``, ``--fuse-bm25 w``): the teacher's score of each candidate
becomes a mix of its own and BM25's, per query, as a retriever ensemble fuses them: both are
standardised over the query's scored documents, mixed as (1 - w) z_teacher + w z_bm25, and put
back on the teacher's scale (its mean and spread over those documents), so that
``task.teacher_temperature`` keeps its meaning. Candidates are then sorted by the fused score.

The output is FlagEmbedding JSONL ``{"query", "pos", "neg"}`` (plus ``pos_scores``/``neg_scores``
with the model's scores for ``--retriever model|dense``: teacher scores for ``task.loss=distill``
or ``task.distill_weight``), written atomically; the same inputs and seed
give a byte-identical file. Then train with ``data=beir data.train_path=OUT
data.eval_collection=BEIR_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megarank.data.beir import Collection, load_collection
from megarank.data.ranking import RELEVANCE_THRESHOLD, build_run, rank_documents
from megarank.errors import ArgumentError
from megarank.parallel.env import group_rank_and_size, is_main_process

RETRIEVERS = ("bm25", "model", "dense")

Rescorer = Callable[[Collection, list[tuple[str, str]]], list[float]]
"""Scores of (qid, docid) pairs of a collection under some model (higher is better)."""

# The shipped run.bm25.trec files are plain BM25 with these parameters and no stemming.
BM25_K1, BM25_B, BM25_STOPWORDS = 0.9, 0.4, "en"


class BM25Index:
    """bm25s over a collection's documents (``document_text``, as the reranker reads them)."""

    def __init__(self, corpus: dict[str, str], progress: bool = True) -> None:
        import bm25s  # here, not at the top: every command imports this module (0.5 s)

        self.docids = list(corpus)
        self.position = {d: i for i, d in enumerate(self.docids)}
        """docid -> its index in ``scores``."""
        tokens = bm25s.tokenize([corpus[d] for d in self.docids], stopwords=BM25_STOPWORDS,
                                show_progress=progress)
        self.bm25 = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
        self.bm25.index(tokens, show_progress=progress)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``, [len(docids)] float32."""
        import bm25s

        # The query's words the corpus never uses add nothing, and bm25s needs at least one.
        words = bm25s.tokenize(query, stopwords=BM25_STOPWORDS, return_ids=False,
                               show_progress=False)[0]
        words = [w for w in words if w in self.bm25.vocab_dict]
        if not words:
            return np.zeros(len(self.docids), dtype=np.float32)
        return self.bm25.get_scores(words)

    def top(self, query: str, depth: int) -> tuple[list[tuple[str, float]], np.ndarray]:
        """(the ``depth`` best (docid, score) with score > 0, best first, all scores).

        Equal scores go by docid, including at the cut-off, so the list never depends on how
        the sort happened to break a tie. Documents sharing no word with the query are not
        retrieved at all (score 0), as in Lucene.
        """
        s = self.scores(query)
        if depth < len(s):
            # Everything tied with the depth-th score stays in, for the docid order to decide.
            kth = np.partition(s, len(s) - depth)[len(s) - depth]
            idx = np.flatnonzero(s >= kth)
        else:
            idx = np.arange(len(s))
        found = {self.docids[i]: float(s[i]) for i in idx if s[i] > 0}
        return [(d, found[d]) for d in rank_documents(found)[:depth]], s


@dataclass
class MineStats:
    """What happened to the split's queries."""

    written: int = 0
    """Triplets in the output file."""
    skipped_no_positive: list[str] = field(default_factory=list)
    """Queries without a document judged relevant: no triplet."""
    short: list[str] = field(default_factory=list)
    """Queries written with fewer negatives than asked for."""
    pseudo_written: int = 0
    """Of ``written``, the pseudo-queries' triplets."""
    skipped_pseudo: list[str] = field(default_factory=list)
    """Pseudo-queries with fewer than two candidates besides their source document (a positive
    and a negative): no triplet."""


PSEUDO_PREFIX = "pseudo:"
"""Query id of the pseudo-query made from document d: ``pseudo:<d>``."""
PSEUDO_MIN_WORDS, PSEUDO_MAX_WORDS = 3, 32
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def first_sentence(text: str) -> str:
    """A document's first sentence (its title, for a titled collection's ``document_text``),
    without end punctuation, cut to ``PSEUDO_MAX_WORDS`` words."""
    sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip().rstrip(" .?!")
    return " ".join(sentence.split()[:PSEUDO_MAX_WORDS])


def pseudo_queries(corpus: dict[str, str], n: int, seed: int) -> dict[str, tuple[str, str]]:
    """{pseudo qid: (query text, source docid)} for ``n`` documents drawn without replacement by
    a Generator seeded from ``seed`` (all of them when the corpus has no more), in corpus order.

    A first sentence of under ``PSEUDO_MIN_WORDS`` words, or one met before, makes no query,
    so there can be fewer than ``n``.
    """
    if n < 0:
        raise ArgumentError("{0} must be >= 0, got {n}", "pseudo_queries", n=n)
    docids = list(corpus)
    if n < len(docids):
        chosen = np.random.default_rng([seed, zlib.crc32(b"pseudo-queries")]).choice(
            len(docids), size=n, replace=False)
        docids = [docids[i] for i in sorted(chosen.tolist())]
    out: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    for d in docids:
        text = first_sentence(corpus[d])
        if len(text.split()) < PSEUDO_MIN_WORDS or text.lower() in seen:
            continue
        seen.add(text.lower())
        out[PSEUDO_PREFIX + d] = (text, d)
    return out


def _query_rng(seed: int, qid: str) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(qid.encode("utf-8"))])


def select_negatives(ranked: list[tuple[str, float]], positives: dict[str, float],
                     corpus: dict[str, str], qid: str, *, skip_top: int, negatives: int,
                     margin: float | None, seed: int) -> list[tuple[str, float]]:
    """Steps 1-4 of the module docstring for one query: the chosen (docid, score), rank order.

    ``ranked`` is best first; ``positives`` maps each judged-relevant docid to its score under
    the same retriever.
    """
    pos_texts = {corpus[d] for d in positives}
    pool = [(d, s) for d, s in ranked[skip_top:]
            if d not in positives and corpus[d] not in pos_texts]
    if margin is not None:
        ceiling = min(positives.values()) - margin
        pool = [(d, s) for d, s in pool if s <= ceiling]
    if len(pool) <= negatives:
        return pool
    chosen = _query_rng(seed, qid).choice(len(pool), size=negatives, replace=False)
    return [pool[i] for i in sorted(chosen.tolist())]


def judged_positives(coll: Collection, qid: str) -> list[str]:
    """Docids judged relevant for ``qid``, most relevant first, then by docid."""
    judged = coll.qrels.get(qid, {})
    rel = [d for d, r in judged.items() if r >= RELEVANCE_THRESHOLD]
    return sorted(rel, key=lambda d: (-judged[d], d))


def split_queries(coll: Collection, split: str | None) -> list[str]:
    """The split's qids; None: ``train`` when there is a split.json, else every judged query."""
    if split is None and coll.split is not None:
        split = "train"
    return coll.split_qids(split) if split is not None else list(coll.qrels)


def mine(collection: str | Path, out: str | Path, split: str | None = None,
         rescore: Rescorer | None = None, depth: int = 100, skip_top: int = 0,
         negatives: int = 15, margin: float | None = None, seed: int = 0,
         progress: bool = True, pseudo: int = 0, fuse_bm25: float = 0.0) -> MineStats:
    """Write the triplet file ``out`` (rank 0) and return what happened to the queries.

    Candidates are BM25's top ``depth``; with ``rescore`` (a reranker's or an embedder's scores)
    the candidates and positives are re-sorted by its scores, which are written as
    ``pos_scores``/``neg_scores``. ``pseudo``: that many pseudo-queries' triplets follow the
    judged queries' (see the module docstring). ``fuse_bm25``: the weight of BM25 in a fused
    teacher (module docstring).
    """
    _check_arguments(depth, skip_top, negatives, fuse_bm25, pseudo, rescore is not None)
    coll = load_collection(collection)
    qids = split_queries(coll, split)
    coll, made = _with_pseudo_queries(coll, pseudo, seed)
    stats = MineStats()
    positives = {}
    for q in qids:
        if pos := judged_positives(coll, q):
            positives[q] = pos
        else:
            stats.skipped_no_positive.append(q)
    ranked, pos_scores = _bm25_candidates(coll, positives, made, depth, progress)
    if rescore is not None:
        unlabelled = {**positives, **dict.fromkeys(made, [])}
        keys = _pairs_to_score(ranked, unlabelled)
        scores = rescore(coll, keys)
        if fuse_bm25:
            bm25 = {q: {**dict(ranked[q]), **pos_scores.get(q, {})} for q in ranked}
            scores = fused_scores(keys, scores, [bm25[q][d] for q, d in keys], fuse_bm25)
        ranked, pos_scores = _resorted(ranked, unlabelled, build_run(keys, scores, ranked))
    for p in made:  # the teacher's best candidate is the pseudo-query's positive
        if len(ranked[p]) < 2:  # and at least one other is its negative
            stats.skipped_pseudo.append(p)
            continue
        (best, score), ranked[p] = ranked[p][0], ranked[p][1:]
        positives[p], pos_scores[p] = [best], {best: score}
    rows = []
    for q, pos in positives.items():
        negs = select_negatives(ranked[q], pos_scores[q], coll.corpus, q, skip_top=skip_top,
                                negatives=negatives, margin=margin, seed=seed)
        if len(negs) < negatives:
            stats.short.append(q)
        rows.append(_triplet_row(coll, q, pos, negs, pos_scores[q] if rescore else None))
    stats.written = len(rows)
    stats.pseudo_written = sum(1 for q in positives if q in made)
    if is_main_process():
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(rows), encoding="utf-8")
        os.replace(tmp, out)
    return stats


def _check_arguments(depth: int, skip_top: int, negatives: int, fuse_bm25: float, pseudo: int,
                     teacher: bool) -> None:
    """Refuse settings :func:`mine` cannot run, naming the parameter
    (:func:`megarank.api.mine_triplets`'s)."""
    if depth < 1 or skip_top < 0 or negatives < 1:
        raise ArgumentError("need {0} >= 1, {1} >= 0, {2} >= 1; got {depth}, {skip_top}, "
                            "{negatives}", "depth", "skip_top", "negatives", depth=depth,
                            skip_top=skip_top, negatives=negatives)
    if not 0.0 <= fuse_bm25 <= 1.0:
        raise ArgumentError("{0} must be in [0, 1], got {value}", "fuse_bm25", value=fuse_bm25)
    if fuse_bm25 and not teacher:
        raise ArgumentError("{0} mixes BM25 into a teacher's scores: {1} dense or {1} model",
                            "fuse_bm25", "retriever")
    if pseudo and not teacher:
        raise ArgumentError("{0} needs a teacher to label them: {1} dense or {1} model",
                            "pseudo_queries", "retriever")


def _with_pseudo_queries(coll: Any, pseudo: int, seed: int) -> tuple[Any, dict]:
    """The collection with ``pseudo`` pseudo-queries added to its queries, and those
    (id -> (text, source document)); none when ``pseudo`` is 0."""
    made = pseudo_queries(coll.corpus, pseudo, seed) if pseudo else {}
    if clash := sorted(set(made) & set(coll.queries)):
        raise ArgumentError("{path}: query id {qid!r} is taken by a pseudo-query's id; rename it "
                            "or mine without pseudo-queries ({0} 0)", "pseudo_queries",
                            path=coll.root / "queries.jsonl", qid=clash[0])
    if made:
        coll = dataclasses.replace(coll, queries={**coll.queries,
                                                  **{p: t for p, (t, _) in made.items()}})
    return coll, made


def _bm25_candidates(coll: Any, positives: dict, made: dict, depth: int, progress: bool,
                     ) -> tuple[dict[str, list[tuple[str, float]]], dict[str, dict[str, float]]]:
    """BM25's top ``depth`` of each query (a pseudo-query's source and its copies left out) and
    the BM25 scores of each query's positives. Under a process group the index is built once,
    on rank 0, and the result shared."""
    ranked: dict[str, list[tuple[str, float]]] = {}
    pos_scores: dict[str, dict[str, float]] = {}
    rank, world = group_rank_and_size()
    if rank == 0:
        index = BM25Index(coll.corpus, progress and is_main_process())
        for q in tqdm(positives, desc="bm25", unit="query", disable=not (progress and is_main_process()),
                      file=sys.stderr):
            ranked[q], all_scores = index.top(coll.queries[q], depth)
            pos_scores[q] = {d: float(all_scores[index.position[d]]) for d in positives[q]}
        for p, (text, src) in made.items():  # the source and its copies are no candidates
            top, _ = index.top(text, depth + 1)
            ranked[p] = [(d, s) for d, s in top
                         if d != src and coll.corpus[d] != coll.corpus[src]][:depth]
    if world > 1:
        import torch.distributed as dist

        shared = [(ranked, pos_scores)]
        dist.broadcast_object_list(shared, src=0)
        ranked, pos_scores = shared[0]
    return ranked, pos_scores


def _triplet_row(coll: Any, q: str, pos: list[str], negs: list[tuple[str, float]],
                 scores: dict[str, float] | None) -> str:
    """One FlagEmbedding triplet line; with a teacher's ``scores``, pos_scores and
    neg_scores too."""
    row: dict[str, Any] = {"query": coll.queries[q], "pos": [coll.corpus[d] for d in pos],
                           "neg": [coll.corpus[d] for d, _ in negs]}
    if scores is not None:
        row["pos_scores"] = [scores[d] for d in pos]
        row["neg_scores"] = [s for _, s in negs]
    return json.dumps(row, ensure_ascii=False) + "\n"


def fused_scores(keys: list[tuple[str, str]], teacher: list[float], bm25: list[float],
                 weight: float) -> list[float]:
    """Per query: mean_t + std_t * ((1 - weight) z(teacher) + weight z(bm25)), z standardising
    over that query's keys; a query whose scores are all equal adds nothing to the mix."""
    rows: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(keys):
        rows.setdefault(q, []).append(i)
    t, b = np.asarray(teacher, dtype=np.float64), np.asarray(bm25, dtype=np.float64)
    out = t.copy()
    for idx in rows.values():
        tq, bq = t[idx], b[idx]
        zt = (tq - tq.mean()) / tq.std() if tq.std() > 0 else np.zeros_like(tq)
        zb = (bq - bq.mean()) / bq.std() if bq.std() > 0 else np.zeros_like(bq)
        out[idx] = tq.mean() + tq.std() * ((1.0 - weight) * zt + weight * zb)
    return out.tolist()


def dense_rescorer(model_dir: str | Path, batch_size: int = 64, progress: bool = True,
                   max_length: int | None = None) -> Rescorer:
    """Cosine similarity under a sentence-transformers embedding model (a bi-encoder such as
    all-MiniLM-L6-v2), as FlagEmbedding mines with an embedder. Under a process group each
    text is embedded once, by one rank (see `embed_once`). ``max_length``: tokens of each text
    the embedder reads (its ``max_seq_length``; None keeps the model's own, 256 for
    all-MiniLM-L6-v2): shorter embeds long documents faster, from their beginning only."""
    from sentence_transformers import SentenceTransformer

    # device=None: sentence-transformers picks CUDA when there is one.
    embedder = SentenceTransformer(str(model_dir))
    if max_length is not None:
        embedder.max_seq_length = max_length

    def encode(texts: list[str]) -> np.ndarray:
        return embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)

    def rescore(coll: Collection, keys: list[tuple[str, str]]) -> list[float]:
        docids = list(dict.fromkeys(d for _, d in keys))
        qids = list(dict.fromkeys(q for q, _ in keys))
        doc_vecs = dict(zip(docids, embed_once([coll.corpus[d] for d in docids], encode,
                                               batch_size, progress, "embed documents"),
                            strict=True))
        query_vecs = dict(zip(qids, embed_once([coll.queries[q] for q in qids], encode,
                                               batch_size, progress, "embed queries"),
                              strict=True))
        return [float(query_vecs[q] @ doc_vecs[d]) for q, d in keys]

    return rescore


def embed_once(texts: list[str], encode: Callable[[list[str]], np.ndarray], batch_size: int,
               progress: bool = False, desc: str = "embed") -> np.ndarray:
    """[len(texts), dim] embeddings, each text embedded once across the ranks.

    The texts are cut into batches by length (longest first, ties by position: similar lengths
    pad little) and the batches dealt round robin to the ranks, which all-gather the results.
    One process embeds the very same batches, so its output is identical to any number of
    ranks' (a batch's padding can change an embedding in its last bits; the batches never
    change). Without a process group this process embeds them all.
    """
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = group_rank_and_size()
    mine = {b: encode([texts[i] for i in batches[b]])
            for b in tqdm(range(rank, len(batches), world), desc=desc, unit="batch",
                          disable=not (progress and is_main_process()), file=sys.stderr)}
    if world > 1:
        import torch.distributed as dist

        gathered: list[dict[int, np.ndarray]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, mine)
        mine = {b: v for part in gathered for b, v in part.items()}
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.empty((len(texts), mine[0].shape[1]), dtype=mine[0].dtype)
    for b, rows in enumerate(batches):
        out[rows] = mine[b]
    return out


def _pairs_to_score(ranked: dict[str, list[tuple[str, float]]],
                    positives: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(qid, docid) of every candidate and positive, each once (a positive is usually also a
    candidate)."""
    return [(q, d) for q in ranked
            for d in dict.fromkeys([*(d for d, _ in ranked[q]), *positives[q]])]


def _resorted(ranked: dict[str, list[tuple[str, float]]], positives: dict[str, list[str]],
              by_query: dict[str, dict[str, float]]
              ) -> tuple[dict[str, list[tuple[str, float]]], dict[str, dict[str, float]]]:
    """The candidates re-sorted by the new scores ``by_query[q][d]``, and the positives'."""
    new_ranked = {}
    for q, cands in ranked.items():
        model_scores = {d: by_query[q][d] for d, _ in cands}
        new_ranked[q] = [(d, model_scores[d]) for d in rank_documents(model_scores)]
    return new_ranked, {q: {d: by_query[q][d] for d in positives[q]} for q in ranked}
