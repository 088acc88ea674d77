"""A decoder export scores the same in libraries that never read scoring.json.

A tiny Qwen3-Reranker-style model (pair=qwen3_reranker) is imported and exported, as the causal
LM and --as-classifier. Then the README's transformers snippet (run from the README itself),
sentence-transformers' CrossEncoder and `megarank score` give the same scores to 1e-5, and the
config.json fields vLLM's score loader reads are those it needs: its from_2_way_softmax rule,
written out here from vLLM's loader, rebuilds the --as-classifier export's score.weight bitwise.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from megarank.config.schema import ASSETS
from megarank.data.contract import read_contract
from megarank.data.triplets import read_triplets
from tests.helpers.hf_tiny import save_qwen3_reranker
from tests.helpers.runs import REPO, run_cli

pytestmark = pytest.mark.distributed

MAX_LEN = 512


def _pairs() -> list[tuple[str, str]]:
    # Short documents: within max_length every scorer sees the whole pair (README: Truncation).
    records = read_triplets(ASSETS / "collections" / "cranfield" / "train_triplets.jsonl", 6)
    return [(r.query, " ".join(d.split()[:60])) for r in records for d in (r.pos[0], r.neg[0])]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    src = save_qwen3_reranker(root)
    ckpt = root / "ckpt"
    run_cli("megarank.convert", ["from-hf", "--hf", src, "--out", ckpt, "pair=qwen3_reranker",
                                 f"pair.max_length={MAX_LEN}", "pair.max_query_length=64"])
    lm, cls = root / "lm", root / "cls"
    run_cli("megarank.convert", ["to-hf", "--ckpt", ckpt, "--out", lm])
    run_cli("megarank.convert", ["to-hf", "--ckpt", ckpt, "--out", cls, "--as-classifier"])
    pairs = _pairs()
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"query": q, "document": d}) + "\n"
                                  for q, d in pairs))
    scores = {}
    for name, d in (("lm", lm), ("cls", cls)):
        out = root / f"scores_{name}.jsonl"
        run_cli("megarank.score", ["--model", d, "--pairs", pairs_file, "--out", out])
        scores[name] = torch.tensor([json.loads(line)["score"]
                                     for line in out.read_text().splitlines()])
    return lm, cls, pairs, scores


def _readme_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Serving the export", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_readme_transformers_snippet_equals_megarank_score(exports):
    lm, cls, pairs, scores = exports
    code = _readme_snippet()
    export_line = 'EXPORT = "hf/my-reranker"'
    pairs_line = next(line for line in code.splitlines() if line.startswith("pairs = "))
    assert export_line in code
    code = code.replace(export_line, f"EXPORT = {str(lm)!r}").replace(pairs_line,
                                                                      f"pairs = {pairs!r}")
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102 (the README's own code)
    snippet = torch.tensor(env["scores"])
    assert scores["lm"].max() - scores["lm"].min() > 1e-2
    torch.testing.assert_close(snippet, scores["lm"], atol=1e-5, rtol=0)
    # The classifier export: the same batch, logits[:, 0].
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(cls).eval()(
            **env["batch"]).logits[:, 0]
    torch.testing.assert_close(logits, scores["cls"], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["cls"], scores["lm"], atol=1e-5, rtol=0)


def test_sentence_transformers_renders_the_template(exports):
    from sentence_transformers import CrossEncoder

    lm, cls, pairs, scores = exports
    for d, name in ((lm, "lm"), (cls, "cls")):
        got = CrossEncoder(str(d), device="cpu").predict(pairs,
                                                         activation_fn=torch.nn.Identity())
        torch.testing.assert_close(torch.tensor(got).float().flatten(), scores[name], atol=1e-5,
                                   rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_the_template_and_vllm_fields(exports):
    lm, cls, _, _ = exports
    contract = read_contract(lm)  # the serving notes are not part of the contract
    notes = json.loads((lm / "scoring.json").read_text())["serving"]
    assert "--chat-template" in notes["vllm"] and "not served" in notes["tei"]
    template = (lm / "score_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(lm)
    assert tok.chat_template == template
    text = tok.apply_chat_template([{"role": "query", "content": "Q"},
                                    {"role": "document", "content": "D"}], tokenize=False)
    assert text == (contract.prompt_prefix + contract.prompt_template.format(
        instruction=contract.instruction, query="Q", document="D") + contract.prompt_suffix)

    # What vLLM's loader reads (vllm/model_executor/models/adapters.py, config.py): a
    # *ForSequenceClassification override of the causal LM with classifier_from_token
    # [false, true] and method from_2_way_softmax becomes one label whose weight is
    # lm_head[convert_tokens_to_ids(true)] - lm_head[convert_tokens_to_ids(false)]
    # (the input embedding when tie_word_embeddings).
    config = json.loads((lm / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["method"] == "from_2_way_softmax" and config["is_original_qwen3_reranker"]
    assert config["use_sep_token"] is False
    false_id, true_id = tok.convert_tokens_to_ids(config["classifier_from_token"])
    assert (false_id, true_id) == (contract.no_token_id, contract.yes_token_id)
    weights = load_file(lm / "model.safetensors")
    lm_head = weights["model.embed_tokens.weight" if config["tie_word_embeddings"]
                      else "lm_head.weight"]
    score_weight = lm_head[[true_id]].float() - lm_head[[false_id]].float()
    assert torch.equal(score_weight, load_file(cls / "model.safetensors")["score.weight"])

    # The classifier export must not ask vLLM to rebuild score.weight from an lm_head it has not.
    cls_config = json.loads((cls / "config.json").read_text())
    assert cls_config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert cls_config["num_labels"] == 1 and cls_config["use_sep_token"] is False
    assert not {"classifier_from_token", "method", "is_original_qwen3_reranker"} & set(cls_config)
    assert (cls / "score_template.jinja").read_text() == template
