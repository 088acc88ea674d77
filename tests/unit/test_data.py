"""Unit tests for megarank.data: triplet reading, groups, the DP sampler and pair collation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import megarank
from megarank.config.schema import PairConfig
from megarank.data import groups as groups_module
from megarank.data.batch import PairBatch
from megarank.data.groups import Group, GroupDataset, check_records, make_group
from megarank.data.sampler import GroupSampler, epoch_permutation, positions_to_groups
from megarank.data.triplets import DataFormatError, TripletRecord, read_triplets
from tests.helpers.pairs import pair_collator

ASSETS = Path(megarank.__file__).parent / "assets"
CRANFIELD = ASSETS / "collections/cranfield/train_triplets.jsonl"
FLAG_FILES = sorted((ASSETS / "collections/flagembedding_examples").glob("*.jsonl"))
TOKENIZER_DIR = ASSETS / "tokenizers/bert-uncased"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def cranfield() -> list[TripletRecord]:
    return read_triplets(CRANFIELD)


@pytest.fixture(autouse=True)
def _fresh_warning_state():
    groups_module.reset_short_negatives_warning()
    yield
    groups_module.reset_short_negatives_warning()


def _record(num_neg: int, num_pos: int = 1, source: str = "mem:1") -> TripletRecord:
    return TripletRecord(
        query="what is a test",
        pos=tuple(f"pos {i}" for i in range(num_pos)),
        neg=tuple(f"neg {i}" for i in range(num_neg)),
        pos_scores=None,
        neg_scores=None,
        source=source,
    )


# ---------------------------------------------------------------- triplets


@pytest.mark.parametrize("path", [CRANFIELD, *FLAG_FILES], ids=lambda p: p.name)
def test_read_real_files(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    non_blank = [json.loads(line) for line in lines if line.strip()]
    records = read_triplets(path)
    assert len(records) == len(non_blank) > 0
    for lineno, rec in enumerate(records):
        assert rec.query == non_blank[lineno]["query"]
        assert rec.pos and all(isinstance(p, str) for p in rec.pos)
        assert rec.pos == tuple(non_blank[lineno]["pos"])
        assert rec.neg == tuple(non_blank[lineno].get("neg", []))
        assert rec.source.startswith(f"{path}:")
        if rec.pos_scores is not None:
            assert len(rec.pos_scores) == len(rec.pos)
        if rec.neg_scores is not None:
            assert len(rec.neg_scores) == len(rec.neg)


def test_read_cranfield_shape(cranfield: list[TripletRecord]):
    assert len(cranfield) == 112
    assert all(len(r.neg) == 15 for r in cranfield)
    assert cranfield[3].source == f"{CRANFIELD}:4"


def test_read_scores_and_max_records():
    msmarco = ASSETS / "collections/flagembedding_examples/reranker_msmarco_examples.jsonl"
    records = read_triplets(msmarco, max_records=3)
    assert len(records) == 3
    assert records[0].pos_scores is not None and records[0].neg_scores is not None
    assert len(records[0].neg_scores) == len(records[0].neg)


def test_blank_lines_skipped_and_neg_optional(tmp_path: Path):
    path = tmp_path / "ok.jsonl"
    path.write_text(
        '\n{"query": "q1", "pos": ["a"], "neg": ["b"]}\n\n  \n{"query": "q2", "pos": ["c"]}\n'
    )
    records = read_triplets(path)
    assert [r.query for r in records] == ["q1", "q2"]
    assert records[1].neg == ()
    assert records[0].source == f"{path}:2" and records[1].source == f"{path}:5"


GOOD = '{"query": "q", "pos": ["a"], "neg": ["b"]}'
BAD_LINES = {
    "malformed_json": ('{"query": "q", "pos": ["a"]', "malformed JSON"),
    "not_object": ('["q", ["a"]]', "expected a JSON object"),
    "missing_query": ('{"pos": ["a"]}', "missing key 'query'"),
    "empty_query": ('{"query": "  ", "pos": ["a"]}', "'query' must be a non-empty string"),
    "query_not_string": ('{"query": 7, "pos": ["a"]}', "'query' must be a non-empty string"),
    "missing_pos": ('{"query": "q", "neg": ["a"]}', "missing key 'pos'"),
    "empty_pos": ('{"query": "q", "pos": []}', "'pos' is empty"),
    "pos_not_list": ('{"query": "q", "pos": "a"}', "'pos' must be a list of strings"),
    "pos_item_not_string": ('{"query": "q", "pos": ["a", 3]}', "'pos[1]' must be a string"),
    "neg_not_list": ('{"query": "q", "pos": ["a"], "neg": {"x": 1}}', "'neg' must be a list"),
    "neg_item_not_string": ('{"query": "q", "pos": ["a"], "neg": [null]}', "'neg[0]' must be"),
    "pos_scores_length": (
        '{"query": "q", "pos": ["a"], "pos_scores": [1.0, 2.0]}',
        "'pos_scores' has 2 entries but 'pos' has 1",
    ),
    "neg_scores_length": (
        '{"query": "q", "pos": ["a"], "neg": ["b", "c"], "neg_scores": [0.5]}',
        "'neg_scores' has 1 entries but 'neg' has 2",
    ),
    "score_not_number": (
        '{"query": "q", "pos": ["a"], "pos_scores": ["high"]}',
        "'pos_scores[0]' must be a finite number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path: Path, case: str):
    line, expected = BAD_LINES[case]
    path = tmp_path / f"{case}.jsonl"
    # The bad row is the 4th physical line (a blank line counts) so the number must be exact.
    path.write_text(f"{GOOD}\n{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(DataFormatError) as info:
        read_triplets(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert expected in message
    assert info.value.lineno == 4


def test_empty_file_is_an_error(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n   \n")
    with pytest.raises(DataFormatError, match="no records") as info:
        read_triplets(path)
    assert str(info.value).startswith(f"{path}:")


def test_missing_file_names_path(tmp_path: Path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_triplets(path)


def test_bad_utf8_names_line(tmp_path: Path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"query": "\xff", "pos": ["a"]}\n')
    with pytest.raises(DataFormatError, match=r":2: not valid UTF-8"):
        read_triplets(path)


# ---------------------------------------------------------------- groups


def test_group_determinism_and_positive_first(cranfield: list[TripletRecord]):
    rec = cranfield[5]
    a = make_group(rec, 5, group_size=8, seed=3, epoch=0)
    b = make_group(rec, 5, group_size=8, seed=3, epoch=0)
    assert a == b
    assert len(a.docs) == 8 and a.query == rec.query and a.record_index == 5
    assert a.docs[0] in rec.pos
    assert all(d in rec.neg for d in a.docs[1:])
    assert len(set(a.docs[1:])) == 7  # enough negatives: drawn without replacement
    # A new epoch (or seed) draws other negatives: over 5 epochs some must differ.
    others = [make_group(rec, 5, 8, 3, epoch).docs[1:] for epoch in range(1, 6)]
    assert any(o != a.docs[1:] for o in others)
    assert make_group(rec, 5, 8, 4, 0).docs[1:] != a.docs[1:]


def test_group_positive_drawn_among_pos(cranfield: list[TripletRecord]):
    rec = next(r for r in cranfield if len(r.pos) >= 4)
    chosen = {make_group(rec, 0, 2, 0, epoch).docs[0] for epoch in range(40)}
    assert chosen <= set(rec.pos) and len(chosen) > 1


def test_group_does_not_touch_global_rng(cranfield: list[TripletRecord]):
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    make_group(cranfield[0], 0, 8, 0, 0)
    assert (random.random(), np.random.rand()) == expected


def test_group_size_one_is_just_the_positive():
    group = make_group(_record(num_neg=0), 0, group_size=1, seed=0, epoch=0)
    assert group == Group(query="what is a test", docs=("pos 0",), record_index=0)


def test_short_negatives_with_replacement_warns_once():
    rec = _record(num_neg=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = [make_group(rec, i, group_size=8, seed=0, epoch=0) for i in range(20)]
    short = [w for w in caught if "with replacement" in str(w.message)]
    assert len(short) == 1
    for g in groups:
        negs = g.docs[1:]
        assert len(negs) == 7
        # 7 draws from 3 negatives: repeats, every negative used, none more than ceil(7/3) times.
        assert set(negs) == set(rec.neg)
        assert max(negs.count(n) for n in rec.neg) <= 3


def test_check_records_counts_short_once():
    records = [_record(15), _record(3), _record(2), _record(15)]
    with pytest.warns(UserWarning, match="2 of 4 records have fewer than") as caught:
        assert check_records(records, group_size=8) == 2
        make_group(records[1], 1, 8, 0, 0)  # already reported: silent
    assert len([w for w in caught if "negatives" in str(w.message)]) == 1


def test_no_negatives_is_an_error_naming_source():
    rec = _record(num_neg=0, source="/data/x.jsonl:17")
    with pytest.raises(ValueError, match=r"/data/x.jsonl:17: .*no negatives"):
        make_group(rec, 0, group_size=4, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"/data/x.jsonl:17: "):
        check_records([_record(3), rec], group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        make_group(_record(3), 0, group_size=0, seed=0, epoch=0)


def _scored_record(num_neg: int, num_pos: int = 3) -> TripletRecord:
    """A record whose teacher score of each document is readable off its text."""
    pos = tuple(f"pos {i}" for i in range(num_pos))
    neg = tuple(f"neg {i}" for i in range(num_neg))
    return TripletRecord(query="q", pos=pos, neg=neg,
                         pos_scores=tuple(10.0 + i for i in range(num_pos)),
                         neg_scores=tuple(-float(i) for i in range(num_neg)),
                         source="mem:1")


def _score_of(doc: str) -> float:
    kind, i = doc.split()
    return 10.0 + int(i) if kind == "pos" else -float(i)


@pytest.mark.parametrize("num_neg", [15, 3])
def test_group_teacher_scores_follow_their_documents(num_neg):
    rec = _scored_record(num_neg)
    for index in range(10):
        g = make_group(rec, index, group_size=8, seed=0, epoch=index % 3)
        assert g.teacher == tuple(_score_of(d) for d in g.docs)
        # the draw is the one a record without scores gets
        plain = make_group(_record(num_neg, 3), index, group_size=8, seed=0, epoch=index % 3)
        assert plain.docs == g.docs and plain.teacher is None


def test_collator_carries_teacher_scores_row_major(tokenizer):
    collate = pair_collator(tokenizer, "encoder", max_length=32, max_query_length=8)
    groups = [make_group(_scored_record(7), i, 4, 0, 0) for i in range(2)]
    batch = collate(groups)
    assert batch.teacher_scores.tolist() == [s for g in groups for s in g.teacher]
    assert batch.to("cpu").teacher_scores.dtype == torch.float32
    assert collate([make_group(_record(7), 0, 4, 0, 0)]).teacher_scores is None
    # a file where only some records carry scores still trains a loss that ignores them
    assert collate([groups[0], make_group(_record(7), 1, 4, 0, 0)]).teacher_scores is None


def test_group_dataset(cranfield: list[TripletRecord]):
    ds = GroupDataset(cranfield, group_size=16, seed=7)
    assert len(ds) == 112 and ds.num_short == 0
    assert ds[10, 2] == make_group(cranfield[10], 10, 16, 7, 2)


# ---------------------------------------------------------------- sampler


def _take(sampler: GroupSampler, steps: int) -> list[list[tuple[int, int]]]:
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("dp_size", [2, 3])
def test_sampler_one_epoch_disjoint_and_complete(dp_size: int):
    mbs = 4
    num_groups = mbs * dp_size * 5  # divisible: one epoch is exactly 5 micro-steps
    per_rank = [
        [
            item
            for batch in _take(GroupSampler(num_groups, mbs, r, dp_size, seed=11), 5)
            for item in batch
        ]
        for r in range(dp_size)
    ]
    seen = [set(g for g, _ in items) for items in per_rank]
    for r in range(dp_size):
        assert len(seen[r]) == len(per_rank[r])  # no repeats within a rank
        assert all(epoch == 0 for _, epoch in per_rank[r])
        for s in range(r + 1, dp_size):
            assert not seen[r] & seen[s]
    assert sorted(g for items in per_rank for g, _ in items) == list(range(num_groups))


@pytest.mark.parametrize("dp_size", [2, 3])
def test_sampler_non_divisible_covers_positions(dp_size: int):
    mbs, num_groups, steps = 3, 17, 7  # 7 * 3 * dp_size positions cross at least one epoch end
    batches = {
        r: _take(GroupSampler(num_groups, mbs, r, dp_size, seed=5), steps) for r in range(dp_size)
    }
    # Interleave rank slices back into the global stream: step-major, then rank, then slot.
    stream = [item for step in range(steps) for r in range(dp_size) for item in batches[r][step]]
    assert stream == positions_to_groups(range(steps * mbs * dp_size), num_groups, seed=5)
    # Nothing dropped at the epoch boundary: epoch 0 is every group exactly once.
    epoch0 = [g for g, e in stream if e == 0]
    assert sorted(epoch0) == list(range(num_groups))
    epoch1 = [g for g, e in stream if e == 1]
    assert len(set(epoch1)) == len(epoch1)
    assert all(len(b) == mbs for r in batches for b in batches[r])


def test_sampler_epochs_are_different_permutations():
    p0, p1 = epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 1)
    assert sorted(p0.tolist()) == list(range(50)) and p0.tolist() != p1.tolist()
    assert epoch_permutation(50, 1, 0, shuffle=False).tolist() == list(range(50))
    batches = _take(GroupSampler(10, 5, 0, 1, seed=0, shuffle=False), 3)
    assert batches == [
        [(i, 0) for i in range(5)],
        [(i, 0) for i in range(5, 10)],
        [(i, 1) for i in range(5)],
    ]


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_sampler_resume_is_exact_continuation(dp_size: int):
    mbs, num_groups = 2, 13
    for rank in range(dp_size):
        fresh = _take(GroupSampler(num_groups, mbs, rank, dp_size, seed=9), 20)
        for stopped_after in (1, 6, 13):
            consumed = stopped_after * mbs * dp_size
            resumed = _take(
                GroupSampler(num_groups, mbs, rank, dp_size, seed=9, consumed_samples=consumed),
                20 - stopped_after,
            )
            assert resumed == fresh[stopped_after:]


def test_sampler_validation_names_argument():
    with pytest.raises(ValueError, match="dp_rank"):
        GroupSampler(10, 2, dp_rank=2, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GroupSampler(10, 0, 0, 1, seed=0)
    with pytest.raises(ValueError, match="dp_size"):
        GroupSampler(10, 2, 0, 0, seed=0)
    with pytest.raises(ValueError, match="num_groups"):
        GroupSampler(0, 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="consumed_samples"):
        GroupSampler(10, 2, 0, 1, seed=0, consumed_samples=-1)


# ---------------------------------------------------------------- collation


def _groups(cranfield: list[TripletRecord], n: int, group_size: int) -> list[Group]:
    return [make_group(cranfield[i], i, group_size, 0, 0) for i in range(n)]


def _check_right_padded(batch: PairBatch, pad_id: int):
    lengths = batch.attention_mask.sum(dim=1)  # [N]
    for i, length in enumerate(lengths.tolist()):
        assert batch.attention_mask[i, :length].eq(1).all()
        assert batch.attention_mask[i, length:].eq(0).all()
        assert batch.input_ids[i, length:].eq(pad_id).all()
        assert batch.token_type_ids[i, length:].eq(0).all()
    assert batch.num_real_tokens == int(lengths.sum())
    return lengths


def test_encoder_shapes_padding_types(tokenizer, cranfield):
    collate = pair_collator(
        tokenizer, "encoder", max_length=96, max_query_length=24, pad_to_multiple_of=8
    )
    groups = _groups(cranfield, 3, 4)
    batch = collate(groups)
    assert batch.input_ids.shape[0] == 12 and batch.group_size == 4
    assert batch.input_ids.shape[1] % 8 == 0 and batch.input_ids.shape[1] <= 96
    for t in (batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.pool_index):
        assert t.dtype == torch.long
    lengths = _check_right_padded(batch, tokenizer.pad_token_id)
    assert batch.pool_index.eq(0).all()
    assert batch.input_ids[:, 0].eq(tokenizer.cls_token_id).all()
    # Row-major by group: row g*4 + j holds group g's document j; the query segment (types 0)
    # then the document segment (types 1) ending with [SEP].
    for g, group in enumerate(groups):
        for j, doc in enumerate(group.docs):
            row = g * 4 + j
            ids = batch.input_ids[row, : lengths[row]].tolist()
            types = batch.token_type_ids[row, : lengths[row]].tolist()
            first_sep = ids.index(tokenizer.sep_token_id)
            assert types[: first_sep + 1] == [0] * (first_sep + 1)
            assert types[first_sep + 1 :] == [1] * (len(ids) - first_sep - 1)
            assert ids[-1] == tokenizer.sep_token_id
            doc_ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            assert ids[first_sep + 1 : -1] == doc_ids[: len(ids) - first_sep - 2]


def test_encoder_matches_tokenizer_pair_for_short_pairs(tokenizer, cranfield):
    collate = pair_collator(tokenizer, "encoder", max_length=512, max_query_length=64)
    pairs = [(r.query, r.pos[0][:200]) for r in cranfield[:6]]
    batch = collate.encode_pairs(pairs)
    assert batch.group_size == 1 and batch.input_ids.shape[0] == 6
    for i, (q, d) in enumerate(pairs):
        ref = tokenizer(q, d)
        n = len(ref["input_ids"])
        assert batch.attention_mask[i].sum() == n
        assert batch.input_ids[i, :n].tolist() == ref["input_ids"]
        assert batch.token_type_ids[i, :n].tolist() == ref["token_type_ids"]


def test_a_document_scored_for_several_queries_is_tokenized_once(tokenizer, cranfield):
    """Reranking pairs share documents across queries: the tokenizer reads each distinct
    document (and query) text once, and every row still equals the tokenizer's own pair."""
    collate = pair_collator(tokenizer, "encoder", max_length=512, max_query_length=64)
    docs = [r.pos[0][:200] for r in cranfield[:2]]
    queries = [r.query for r in cranfield[:3]]
    pairs = [(q, d) for q in queries for d in docs]  # 6 rows, 2 documents, 3 queries
    texts_read = []
    original = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        texts_read.extend(text if isinstance(text, list) else [text])
        return original(self, text, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(tokenizer), "__call__", counting)
        batch = collate.encode_pairs(pairs)
    assert sorted(texts_read) == sorted(queries + docs)
    for i, (q, d) in enumerate(pairs):
        ref = tokenizer(q, d)["input_ids"]
        assert batch.input_ids[i, : len(ref)].tolist() == ref
        assert batch.attention_mask[i].sum() == len(ref)


def test_encoder_truncates_document_not_query(tokenizer, cranfield):
    max_length, max_query = 48, 12
    collate = pair_collator(
        tokenizer, "encoder", max_length=max_length, max_query_length=max_query
    )
    long_query = " ".join(["boundary layer"] * 20)
    pairs = [(cranfield[0].query, cranfield[0].pos[0]), (long_query, cranfield[1].pos[0])]
    batch = collate.encode_pairs(pairs)
    assert batch.input_ids.shape[1] <= max_length
    for i, (q, d) in enumerate(pairs):
        ids = batch.input_ids[i, : batch.attention_mask[i].sum()].tolist()
        assert len(ids) == max_length  # long documents fill the budget exactly
        q_ids = tokenizer(q, add_special_tokens=False)["input_ids"][:max_query]
        assert ids[1 : 1 + len(q_ids)] == q_ids  # the query survives (only cut by max_query)
        d_kept = max_length - 3 - len(q_ids)
        assert (
            ids[2 + len(q_ids) : -1] == tokenizer(d, add_special_tokens=False)["input_ids"][:d_kept]
        )
    # The second query is longer than max_query_length: cut to exactly 12 tokens.
    assert batch.token_type_ids[1].tolist().index(1) == 1 + max_query + 1


def test_decoder_template_pool_and_truncation(tokenizer, cranfield):
    collate = pair_collator(
        tokenizer, "decoder", max_length=64, max_query_length=16, pad_to_multiple_of=4
    )
    assert collate.template.text == PairConfig().template
    groups = [make_group(cranfield[0], 0, 2, 0, 0), Group("short q", ("tiny doc", "x"), 1)]
    batch = collate(groups)
    assert batch.input_ids.shape == (4, 64)  # the long pair fills max_length, a multiple of 4
    lengths = _check_right_padded(batch, tokenizer.pad_token_id)
    assert batch.token_type_ids.eq(0).all()
    assert batch.pool_index.tolist() == (lengths - 1).tolist()
    suffix = tokenizer("\nRelevant:", add_special_tokens=False)["input_ids"]
    prefix = tokenizer("Query: ", add_special_tokens=False)["input_ids"]
    for row in range(4):
        ids = batch.input_ids[row, : lengths[row]].tolist()
        assert ids[: len(prefix)] == prefix and ids[-len(suffix) :] == suffix  # template never cut
        assert tokenizer.cls_token_id not in ids and tokenizer.sep_token_id not in ids
    short = batch.input_ids[3, : lengths[3]].tolist()
    expected = tokenizer("Query: short q\nDocument: x\nRelevant:", add_special_tokens=False)[
        "input_ids"
    ]
    assert short == expected
    # Row 0: query kept whole, document cut.
    q_ids = tokenizer(cranfield[0].query, add_special_tokens=False)["input_ids"][:16]
    row0 = batch.input_ids[0, : lengths[0]].tolist()
    assert row0[len(prefix) : len(prefix) + len(q_ids)] == q_ids
    assert lengths[0] == 64


def test_decoder_bos_and_custom_template(cranfield):
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), bos_token="[unused1]")
    collate = pair_collator(
        tok, "decoder", max_length=40, max_query_length=8, template="{document} || {query} ?"
    )
    batch = collate.encode_pairs([("a question", cranfield[0].pos[0])])
    ids = batch.input_ids[0].tolist()
    assert ids[0] == tok.bos_token_id and len(ids) == 40
    tail = tok(" || a question ?", add_special_tokens=False)["input_ids"]
    assert ids[-len(tail) :] == tail
    assert batch.pool_index.tolist() == [39]


def test_collator_validation(tokenizer):
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pair_collator(
            tokenizer, "encoder", max_length=60, max_query_length=8, pad_to_multiple_of=8
        )
    with pytest.raises(ValueError, match="max_query_length"):
        pair_collator(tokenizer, "encoder", max_length=16, max_query_length=13)
    with pytest.raises(ValueError, match=r"\{document\}"):
        pair_collator(
            tokenizer, "decoder", max_length=64, max_query_length=8, template="{query}"
        )
    collate = pair_collator(tokenizer, "encoder", max_length=64, max_query_length=8)
    with pytest.raises(ValueError, match="share one size"):
        collate([Group("q", ("a", "b"), 0), Group("q", ("a",), 1)])


def test_pair_batch_to(tokenizer):
    collate = pair_collator(tokenizer, "encoder", max_length=32, max_query_length=8)
    batch = collate.encode_pairs([("q", "d")])
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.input_ids, batch.input_ids)
    assert moved.group_size == 1 and moved.num_real_tokens == batch.num_real_tokens


def test_threads_sharing_a_tokenizer_each_get_their_own_truncation(tokenizer):
    """Serving tokenizes on several threads with one tokenizer, whose truncation is state its
    backend keeps between calls: unguarded, a thread cutting documents at 100 tokens got
    another's query limit of 4 (about 80 wrong in 800 calls)."""
    import threading

    from megarank.data.templates import plain_ids

    doc = " ".join(["the flutter of a thin wing panel in supersonic flow"] * 12)
    want = {n: plain_ids(tokenizer, [doc], n) for n in (4, 100, None)}
    wrong = []

    def work(n):
        for _ in range(200):
            if plain_ids(tokenizer, [doc], n) != want[n]:
                wrong.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in (4, 100, None, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(want[None][0]) > 100 and not wrong
