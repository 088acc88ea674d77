"""A prepared dataset knows its tokenizer by content, not by path: the same tokenizer files in
another directory (another checkout, cache or mount) read it; a tokenizer whose content differs
is refused, the paths named so that the files can be compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import megarank
from megarank.data.collate import PairCollator
from megarank.data.prepared import PreparedError, open_prepared, write_prepared
from tests.helpers.pairs import pair_collator

ASSETS = Path(megarank.__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizers/bert-uncased"
CRANFIELD = ASSETS / "collections/cranfield/train_triplets.jsonl"


def _copy_tokenizer(root: Path) -> Path:
    """The shipped tokenizer's files, copied to ``root/tokenizers/bert-uncased``."""
    return Path(shutil.copytree(TOKENIZER_DIR, root / "tokenizers" / "bert-uncased"))


def _collator(tokenizer_dir: Path) -> PairCollator:
    return pair_collator(AutoTokenizer.from_pretrained(str(tokenizer_dir)), "encoder",
                        max_length=64, max_query_length=32)


def _swap_two_tokens(tokenizer_dir: Path) -> None:
    """Give "the" and "of" each other's ids: same class, size and path, other token ids."""
    path = tokenizer_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["of"] = vocab["of"], vocab["the"]
    path.write_text(json.dumps(spec))


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, Path]:
    """A few Cranfield records prepared with the tokenizer copied to checkout A; (the prepared
    directory, A's tokenizer directory)."""
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text("".join(CRANFIELD.read_text().splitlines(keepends=True)[:4]))
    tokenizer_a = _copy_tokenizer(tmp_path / "A")
    write_prepared([triplets], tmp_path / "prep", _collator(tokenizer_a), progress=False)
    return tmp_path / "prep", tokenizer_a


def test_the_same_tokenizer_read_from_another_directory_is_accepted(tmp_path, prepared):
    prep, tokenizer_a = prepared
    data = open_prepared(prep)
    assert data.meta["settings"]["tokenizer"] == str(tokenizer_a)  # recorded, as information
    tokenizer_b = _copy_tokenizer(tmp_path / "B")
    collator_b = _collator(tokenizer_b)
    assert collator_b.token_settings()["tokenizer"] == str(tokenizer_b)
    data.check_settings(collator_b)
    # ...and it is the same tokenizer: B's ids are the prepared ones.
    query = json.loads(CRANFIELD.read_text().splitlines()[0])["query"]
    assert data.query(int(data.a["group_query"][0])) == collator_b.tokenize_queries([query])[0]


def test_a_tokenizer_with_other_content_is_refused_naming_both_paths(tmp_path, prepared):
    prep, tokenizer_a = prepared
    data = open_prepared(prep)
    tokenizer_c = _copy_tokenizer(tmp_path / "C")
    _swap_two_tokens(tokenizer_c)
    with pytest.raises(PreparedError) as refused:
        data.check_settings(_collator(tokenizer_c))
    message = str(refused.value)
    assert f"{prep} was prepared for another tokenizer or truncation" in message
    assert "tokenizer_sha256 (config field model.tokenizer): prepared with '" in message
    assert (f"the tokenizer was read from {str(tokenizer_a)!r} when prepared and from "
            f"{str(tokenizer_c)!r} by this run") in message
    assert "tokenizer_size" not in message and "tokenizer_class" not in message
    # The same path whose files changed since: refused too, said as such.
    _swap_two_tokens(tokenizer_a)
    with pytest.raises(PreparedError, match=r"tokenizer_sha256 .* the tokenizer at '.*/A/"
                                            r"tokenizers/bert-uncased' has changed since"):
        data.check_settings(_collator(tokenizer_a))
