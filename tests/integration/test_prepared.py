"""Prepared datasets (``megarank prepare``): the same batches as the JSONL path, refusal of another
tokenizer or truncation, file:line errors with nothing left behind, and the background prefetch."""

from __future__ import annotations

import json
import threading
import time
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch

from megarank.api import compose_config, prepare_data
from megarank.bundle import build_collator, build_tokenizer, checked_contract
from megarank.checkpoint.hf import apply_hf_config
from megarank.config import ConfigError, validate
from megarank.data.groups import GroupDataset
from megarank.data.mining import embed_once
from megarank.data.prefetch import Prefetcher
from megarank.data.prepared import PreparedError, open_prepared, write_prepared
from megarank.data.sampler import GroupSampler
from megarank.data.triplets import DataFormatError, read_triplets
from megarank.parallel.runtime import Runtime
from megarank.training.setup import build_data
from tests.helpers.runs import ASSETS

CRANFIELD = ASSETS / "cranfield" / "train_triplets.jsonl"
FIELDS = ("input_ids", "attention_mask", "token_type_ids", "pool_index", "teacher_scores")


def _overrides(model: str, max_length: int = 64) -> list[str]:
    return [f"model={model}", f"pair.max_length={max_length}", "task=listwise",
            "task.group_size=8", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]


def _collator(overrides: list[str]):
    cfg = compose_config(overrides)
    apply_hf_config(cfg)
    tokenizer = build_tokenizer(cfg)
    return cfg, build_collator(cfg, checked_contract(cfg, tokenizer, None), tokenizer)


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """Cranfield's triplets with teacher scores (random, fixed), a duplicated document text and
    a record whose positive repeats as another's negative, as mined data has."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "scored.jsonl"
    with open(CRANFIELD) as f, open(path, "w") as out:
        for line in f:
            row = json.loads(line)
            row["pos_scores"] = rng.normal(size=len(row["pos"])).tolist()
            row["neg_scores"] = rng.normal(size=len(row["neg"])).tolist()
            out.write(json.dumps(row) + "\n")
    return path


def _runtime(dp_rank: int, dp_size: int) -> Runtime:
    return Runtime(rank=dp_rank, world_size=dp_size, local_rank=dp_rank,
                   device=torch.device("cpu"), tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                   dp_rank=dp_rank, dp_size=dp_size)


@pytest.mark.parametrize("model", ["bert_tiny", "gpt_tiny"])
def test_prepared_batches_equal_the_jsonl_paths_over_two_epochs_dp2(tmp_path, scored, model):
    overrides = _overrides(model)
    cfg, collator = _collator([*overrides, f"data.train_path={scored}"])
    stats = prepare_data([scored], tmp_path / "prep", overrides, progress=False)
    records = read_triplets(scored)
    assert stats.groups == len(records) == 112
    assert stats.distinct_documents < stats.documents_read  # shared documents stored once
    reference = GroupDataset(records, 8, cfg.trainer.seed)
    per_epoch = len(records) // 4  # micro-steps of 2 groups x 2 ranks
    steps = 2 * per_epoch + 3      # two whole epochs and into the third
    for dp_rank in (0, 1):
        runtime = _runtime(dp_rank, 2)
        # The text path as it was before prepared data: tokenized per step from the records.
        sampler = iter(GroupSampler(len(records), 2, dp_rank, 2, cfg.trainer.seed))
        texts = [collator([reference[i, e] for i, e in next(sampler)]) for _ in range(steps)]
        _, jsonl_steps = build_data(cfg, runtime, collator, 0)
        cfg_prep = compose_config([*overrides, f"data.train_path={tmp_path / 'prep'}"])
        _, prep_steps = build_data(cfg_prep, runtime, collator, 0)
        from_jsonl, from_prep = chain.from_iterable(jsonl_steps), chain.from_iterable(prep_steps)
        for step, want in enumerate(texts):
            a, b = next(from_jsonl), next(from_prep)
            assert a.teacher_scores is not None
            for name in FIELDS:
                assert torch.equal(getattr(want, name), getattr(a, name)), (dp_rank, step, name)
                assert torch.equal(getattr(want, name), getattr(b, name)), (dp_rank, step, name)
        jsonl_steps.close()
        prep_steps.close()
    # Epoch 1 draws other negatives than epoch 0 for the same record: the check saw both.
    assert reference[0, 0].docs != reference[0, 1].docs


def test_resume_position_gives_the_uninterrupted_batches(tmp_path, scored):
    overrides = _overrides("bert_tiny")
    prepare_data([scored], tmp_path / "prep", overrides, progress=False)
    cfg, collator = _collator([*overrides, f"data.train_path={tmp_path / 'prep'}"])
    runtime = _runtime(1, 2)
    _, full = build_data(cfg, runtime, collator, 0)  # a step: one micro-batch a rank (4 groups, DP 2)
    batches = [b for _ in range(40) for b in next(full)]
    _, resumed = build_data(cfg, runtime, collator, 4 * 30)  # consumed_samples after 30 steps
    resumed_batches = chain.from_iterable(resumed)
    for want in batches[30:]:
        got = next(resumed_batches)
        assert torch.equal(want.input_ids, got.input_ids)
        assert torch.equal(want.teacher_scores, got.teacher_scores)
    full.close()
    resumed.close()


def test_prepared_arrays_are_memory_mapped_and_hold_each_text_once(tmp_path, scored):
    overrides = _overrides("gpt_tiny")
    _, collator = _collator(overrides)
    write_prepared([scored, CRANFIELD], tmp_path / "prep", collator, progress=False)
    data = open_prepared(tmp_path / "prep")
    assert isinstance(data.doc_tokens, np.memmap)
    assert isinstance(data.a["neg_docs"], np.memmap)
    assert data.num_groups == 224  # two files, in order
    assert data.source(112) == f"{CRANFIELD.resolve()}:1"
    records = read_triplets(scored)
    texts = {t for r in records for t in (*r.pos, *r.neg)}
    assert data.meta["documents"] == len(texts)  # the second file adds no new text
    rec = records[5]
    assert data.query(int(data.a["group_query"][5])) == collator.tokenize_queries([rec.query])[0]
    first_neg = int(data.a["neg_docs"][data.a["neg_offsets"][5]])
    assert data.doc(first_neg) == collator.tokenize_documents([rec.neg[0]])[0]
    # No teacher scores in the second file: recorded per group, NaN in the score arrays.
    assert data.a["has_scores"][:112].all() and not data.a["has_scores"][112:].any()


def test_another_tokenizer_or_truncation_is_refused(tmp_path):
    prepare_data([CRANFIELD], tmp_path / "prep", _overrides("bert_tiny"), progress=False)
    data = open_prepared(tmp_path / "prep")
    _, longer = _collator(_overrides("bert_tiny", max_length=128))
    with pytest.raises(PreparedError, match=r"max_length \(config field pair.max_length\): "
                                            r"prepared with 64, this run has 128"):
        data.check_settings(longer)
    _, decoder = _collator(_overrides("gpt_tiny"))
    with pytest.raises(PreparedError, match=r"kind \(config field model.family\)"):
        data.check_settings(decoder)
    # The same tokenizer name with one more token: another tokenizer all the same.
    cfg, _ = _collator(_overrides("bert_tiny"))
    tokenizer = build_tokenizer(cfg)
    tokenizer.add_tokens(["zzqqx"])
    grown = build_collator(cfg, checked_contract(cfg, tokenizer, None), tokenizer)
    with pytest.raises(PreparedError, match=r"tokenizer_sha256 \(config field model.tokenizer\)"):
        data.check_settings(grown)
    _, same = _collator(_overrides("bert_tiny"))
    data.check_settings(same)


def test_malformed_line_deep_in_a_large_file_stops_prepare_and_leaves_nothing(tmp_path):
    lines = CRANFIELD.read_text().splitlines()
    big = tmp_path / "big.jsonl"
    bad_line = 17_331
    with open(big, "w") as f:
        for n in range(1, 20_001):
            f.write(('{"query": "broken", "pos": ["x"' if n == bad_line
                     else lines[n % len(lines)]) + "\n")
    _, collator = _collator(_overrides("bert_tiny"))
    out = tmp_path / "out" / "prep"
    with pytest.raises(DataFormatError, match=rf"^{big.resolve()}:{bad_line}: malformed JSON"):
        write_prepared([big], out, collator, progress=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the temporary directory is gone too
    # A directory that is not a complete prepared dataset is refused before training starts.
    out.mkdir()
    (out / "doc_tokens.bin").write_bytes(b"\0" * 64)
    cfg = compose_config([*_overrides("bert_tiny"), f"data.train_path={out}"])
    with pytest.raises(ConfigError, match="is a directory but not a complete prepared dataset"):
        validate(cfg, 1)
    with pytest.raises(PreparedError, match="no meta.json"):
        open_prepared(out)


def test_a_truncated_file_is_refused(tmp_path):
    prepare_data([CRANFIELD], tmp_path / "prep", _overrides("bert_tiny"), progress=False)
    tokens = tmp_path / "prep" / "doc_tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(PreparedError, match=r"doc_tokens.bin: expected \d+ bytes"):
        open_prepared(tmp_path / "prep")


def test_prepared_without_teacher_scores_stops_distillation_naming_the_record(tmp_path):
    overrides = _overrides("bert_tiny")
    prepare_data([CRANFIELD], tmp_path / "prep", overrides, progress=False)
    cfg, collator = _collator([*overrides, "task.loss=distill",
                               f"data.train_path={tmp_path / 'prep'}"])
    with pytest.raises(ConfigError, match=rf"{CRANFIELD.resolve()}:1: record has no teacher"):
        build_data(cfg, _runtime(0, 1), collator, 0)


def test_prefetcher_overlaps_the_source_and_keeps_order():
    made = []

    def slow():
        for i in range(6):
            time.sleep(0.05)  # 50 ms to make each item
            made.append(threading.current_thread().name)
            yield i

    ahead = Prefetcher(slow(), depth=3)
    time.sleep(0.3)  # "a step": the worker fills the queue meanwhile
    ahead.take_wait()
    got = [next(ahead) for _ in range(3)]
    assert got == [0, 1, 2]
    assert ahead.take_wait() < 0.02  # made while the step ran
    assert set(made) == {"megarank-prefetch"}
    inline = Prefetcher(slow(), depth=0)
    assert [next(inline) for _ in range(3)] == [0, 1, 2]
    assert inline.take_wait() >= 0.14  # each next() made its item: 3 x 50 ms


def test_prefetcher_raises_the_sources_error_at_its_item():
    def failing():
        yield 1
        raise ValueError("bad record")

    ahead = Prefetcher(failing(), depth=2)
    assert next(ahead) == 1
    with pytest.raises(ValueError, match="bad record"):
        next(ahead)
    ahead.close()


def test_embed_once_embeds_each_text_once_in_length_batches():
    texts = [f"text {'x' * (i % 7)} {i}" for i in range(50)]
    calls: list[list[str]] = []

    def encode(batch: list[str]) -> np.ndarray:
        calls.append(batch)
        return np.array([[len(t), sum(map(ord, t))] for t in batch], dtype=np.float32)

    out = embed_once(texts, encode, batch_size=8)
    seen = [t for batch in calls for t in batch]
    assert sorted(seen) == sorted(texts) and len(calls) == 7
    assert [len(b[0]) for b in calls] == sorted((len(b[0]) for b in calls), reverse=True)
    np.testing.assert_array_equal(out, encode(texts))


def test_chat_prompts_read_jsonl_as_text_and_cannot_be_prepared(tmp_path):
    from tests.helpers.hf_tiny import save_qwen3_reranker

    hf = save_qwen3_reranker(tmp_path / "q3r")
    overrides = ["model=hf", f"model.hf_path={hf}", "pair=qwen3_reranker", "task.group_size=4",
                 "pair.max_length=128", "trainer.micro_batch_size=2",
                 "trainer.global_batch_size=2", f"data.train_path={CRANFIELD}"]
    cfg, collator = _collator(overrides)
    assert not collator.pretokenizable
    with pytest.raises(PreparedError, match="chat prompt"):
        write_prepared([CRANFIELD], tmp_path / "prep", collator, progress=False)
    assert not (tmp_path / "prep").exists()
    records = read_triplets(CRANFIELD)
    reference = GroupDataset(records, 4, cfg.trainer.seed)
    sampler = iter(GroupSampler(len(records), 2, 0, 1, cfg.trainer.seed))
    _, steps = build_data(cfg, _runtime(0, 1), collator, 0)  # prefetched, own tokenizer copy
    batches = chain.from_iterable(steps)
    for _ in range(5):
        want = collator([reference[i, e] for i, e in next(sampler)])
        assert torch.equal(want.input_ids, next(batches).input_ids)
    steps.close()
