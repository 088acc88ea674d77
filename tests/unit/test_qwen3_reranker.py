"""pair=qwen3_reranker scores as the Qwen3-Reranker model card does.

The reference is the model card's code, written out here with transformers alone: prefix + the
"<Instruct>/<Query>/<Document>" text (truncated to max_length - prefix - suffix tokens) + suffix,
left padding, softmax over the [no, yes] logits at the last position. megarank's score is
logit(yes) - logit(no), i.e. logit(p(yes)): the test compares it with the model card's p(yes)
through torch.logit, on a tiny random Qwen3 with a Qwen-style chat tokenizer. In one process.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import megarank
from megarank.config.schema import ASSETS
from megarank.data.groups import Group
from megarank.data.triplets import read_triplets
from tests.helpers.hf_tiny import save_qwen3_reranker
from tests.helpers.pairs import pair_collator

# Verbatim from the Qwen3-Reranker model card.
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
          "Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\"."
          "<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TASK = "Given a web search query, retrieve relevant passages that answer the query"
CUSTOM = "Given an aerodynamics question, find the report that answers it"
MAX_LEN, MAX_Q = 256, 64


def format_instruction(instruction, query, doc):
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def model_card(model_dir, pairs, instructions):
    """p(yes) of each pair, and the token ids the model card feeds the model (left padded)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)
    texts = [format_instruction(i, q, d) for (q, d), i in zip(pairs, instructions, strict=True)]
    inputs = tokenizer(texts, padding=False, truncation="longest_first",
                       return_attention_mask=False,
                       max_length=MAX_LEN - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    ids = [list(x) for x in inputs["input_ids"]]
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=MAX_LEN)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return batch_scores[:, 1].exp(), ids


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    root = tmp_path_factory.mktemp("q3r")
    hf = save_qwen3_reranker(root)
    ckpt = megarank.convert_from_hf(hf, root / "ckpt", [
        "pair=qwen3_reranker", f"pair.max_length={MAX_LEN}", f"pair.max_query_length={MAX_Q}"])
    return hf, ckpt


@pytest.fixture(scope="module")
def pairs():
    records = read_triplets(ASSETS / "collections" / "cranfield" / "train_triplets.jsonl", 10)
    return [(r.query, d) for r in records for d in (r.pos[0], r.neg[0])]


def test_scores_equal_the_model_card(reranker, pairs):
    hf, ckpt = reranker
    tok = AutoTokenizer.from_pretrained(hf)
    assert len(pairs) == 20
    assert all(len(tok(q, add_special_tokens=False)["input_ids"]) <= MAX_Q for q, _ in pairs)
    p_yes, ids = model_card(hf, pairs, [TASK] * len(pairs))
    assert any(len(x) == MAX_LEN for x in ids), "no document was long enough to be cut"
    assert p_yes.max() - p_yes.min() > 0.02, "reference scores hardly differ"
    with megarank.load_scorer(ckpt, ["trainer.device=cpu"]) as scorer:
        c = scorer.bundle.contract
        assert (c.pair_format, c.prompt_prefix, c.prompt_suffix, c.instruction) == (
            "chat", PREFIX, SUFFIX, TASK)
        ours = torch.tensor(scorer.score(pairs))
        batch = scorer.bundle.collator.encode_pairs(pairs)
    got = [row[: int(n)].tolist() for row, n in zip(batch.input_ids, batch.attention_mask.sum(1),
                                                    strict=True)]
    assert got == ids  # token for token, truncated rows included
    torch.testing.assert_close(ours, torch.logit(p_yes.double()).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.sigmoid(ours), p_yes, atol=1e-6, rtol=0)
    assert torch.equal(ours.argsort(), p_yes.argsort())  # the same order


def test_custom_instruction_per_pair_and_by_config(reranker, pairs, tmp_path):
    hf, ckpt = reranker
    p_custom, _ = model_card(hf, pairs, [CUSTOM] * len(pairs))
    p_default, _ = model_card(hf, pairs, [TASK] * len(pairs))
    assert (p_custom - p_default).abs().max() > 1e-3  # the instruction reaches the scores
    mixed = [CUSTOM if i % 2 else TASK for i in range(len(pairs))]
    p_mixed, _ = model_card(hf, pairs, mixed)
    with megarank.load_scorer(ckpt, ["trainer.device=cpu"]) as scorer:
        per_pair = torch.tensor(scorer.score([(q, d, i) for (q, d), i in
                                              zip(pairs, mixed, strict=True)]))
    torch.testing.assert_close(per_pair, torch.logit(p_mixed.double()).float(), atol=1e-5,
                               rtol=0)
    # the task's default instruction, set at import
    other = megarank.convert_from_hf(hf, tmp_path / "custom", [
        "pair=qwen3_reranker", f"pair.instruction='{CUSTOM}'", f"pair.max_length={MAX_LEN}",
        f"pair.max_query_length={MAX_Q}"])
    with megarank.load_scorer(other, ["trainer.device=cpu"]) as scorer:
        assert scorer.bundle.contract.instruction == CUSTOM
        by_config = torch.tensor(scorer.score(pairs))
    torch.testing.assert_close(by_config, torch.logit(p_custom.double()).float(), atol=1e-5,
                               rtol=0)


def test_a_long_document_is_cut_before_the_suffix(reranker):
    hf, _ = reranker
    tok = AutoTokenizer.from_pretrained(hf)
    collator = pair_collator(tok, "decoder", max_length=MAX_LEN, max_query_length=MAX_Q,
                            template="<Instruct>: {instruction}\n<Query>: {query}\n"
                                     "<Document>: {document}",
                            prefix=PREFIX, suffix=SUFFIX, instruction=TASK, pad_to_multiple_of=8)
    long_doc = " ".join(["the boundary layer separates from the wing"] * 200)
    suffix = tok.encode(SUFFIX, add_special_tokens=False)
    prefix = tok.encode(PREFIX, add_special_tokens=False)
    b = collator.encode_pairs([("what is flow separation?", long_doc)])
    ids = b.input_ids[0].tolist()
    assert len(ids) == MAX_LEN and int(b.pool_index[0]) == MAX_LEN - 1
    assert ids[-len(suffix):] == suffix and ids[:len(prefix)] == prefix
    _, ref = model_card(hf, [("what is flow separation?", long_doc)], [TASK])
    assert ids == ref[0]
    # A query past max_query_length is cut (as text, at a token end); the suffix still stays.
    b = collator.encode_pairs([(long_doc, long_doc)])
    assert b.input_ids[0, -len(suffix):].tolist() == suffix


def test_training_groups_carry_their_instruction(reranker):
    hf, _ = reranker
    tok = AutoTokenizer.from_pretrained(hf)
    collator = pair_collator(tok, "decoder", max_length=MAX_LEN, max_query_length=MAX_Q,
                            template="<Instruct>: {instruction}\n<Query>: {query}\n"
                                     "<Document>: {document}",
                            prefix=PREFIX, suffix=SUFFIX, instruction=TASK)
    groups = [Group("q one", ("pos doc", "neg doc"), 0, instruction=CUSTOM),
              Group("q two", ("pos doc", "neg doc"), 1)]
    b = collator(groups)
    for row, instruction, query in ((0, CUSTOM, "q one"), (3, TASK, "q two")):
        text = PREFIX + format_instruction(instruction, query, "neg doc" if row % 2 else
                                           "pos doc")
        want = (tok.encode(PREFIX, add_special_tokens=False)
                + tok.encode(text[len(PREFIX):], add_special_tokens=False)
                + tok.encode(SUFFIX, add_special_tokens=False))
        assert b.input_ids[row, : int(b.attention_mask[row].sum())].tolist() == want


def test_instruction_fields_are_read(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "q", "pos": ["p"], "neg": ["n"], "prompt": "FlagEmbedding"}\n'
                    '{"query": "q", "pos": ["p"], "neg": ["n"], "instruction": "own"}\n'
                    '{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    assert [r.instruction for r in read_triplets(path)] == ["FlagEmbedding", "own", None]


def test_chat_prompt_config_checks_name_the_fields():
    from megarank.config import ConfigError, compose, validate

    cfg = compose(["pair=qwen3_reranker", "model=bert_tiny"])
    cfg.pair.template = "{query} {document} {title}"
    cfg.pair.instruction = None
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    msg = str(err.value)
    assert "pair.prefix (a chat prompt) needs a decoder (model.family gpt)" in msg
    assert "pair.template: template may hold only" in msg and "'title'" in msg
    validate(compose(["pair=qwen3_reranker"]), 1)  # the preset itself is valid
