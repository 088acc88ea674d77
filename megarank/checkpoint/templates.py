"""What a decoder export carries for libraries and servers that never read ``scoring.json``.

transformers, sentence-transformers and vLLM score a (query, document) pair from the model
directory alone. So a decoder export also carries:

- a score template, ``score_template.jinja``, also set as the tokenizer's ``chat_template``: the
  contract's prompt as Jinja over the two messages these libraries build from a pair, roles
  ``query`` and ``document`` (vLLM's score-template convention; sentence-transformers'
  CrossEncoder maps pairs to the same roles);
- the vLLM fields of a score model in ``config.json``: for a yes/no head kept as the causal LM,
  ``classifier_from_token`` = [no, yes] with ``method`` ``from_2_way_softmax`` (vLLM then builds
  ``score.weight = w_yes - w_no`` at load, the ``--as-classifier`` export's weight), and
  ``use_sep_token: false`` (the template builds the whole prompt);
- a ``serving`` section in ``scoring.json`` saying where each of them matches megarank's scores and
  where it cannot (``read_contract`` ignores it).
"""

from __future__ import annotations

import json
import string
from typing import Any

from megarank.data.contract import ScoringContract

TEMPLATE_FILE = "score_template.jinja"

_ROLE = '{{{{ messages | selectattr("role", "eq", "{}") | map(attribute="content") | first }}}}'
_FIELDS = {"query": _ROLE.format("query"), "document": _ROLE.format("document")}


def _literal(text: str) -> str:
    """``text`` as Jinja output, verbatim: a string expression, so that neither Jinja's removal
    of a template's last newline nor transformers' trim_blocks can touch it."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def score_template(contract: ScoringContract, bos_token: str | None) -> str | None:
    """The contract's prompt as a Jinja score template over ``query``/``document`` messages;
    None for encoders (they score the tokenizer's own pair encoding, no template)."""
    if contract.family != "gpt":
        return None
    instruction = "{{ instruction | default(" + json.dumps(contract.instruction) + ", true) }}"
    fields = dict(_FIELDS, instruction=instruction)
    body = "".join(_literal(text) + (fields[name] if name is not None else "")
                   for text, name, _, _ in string.Formatter().parse(contract.prompt_template))
    if contract.pair_format == "chat":
        return _literal(contract.prompt_prefix or "") + body + _literal(
            contract.prompt_suffix or "")
    # megarank puts the tokenizer's BOS in front of a plain template.
    return ("{{ bos_token }}" if bos_token else "") + body


def vllm_fields(contract: ScoringContract, tokenizer: Any, head: str,
                model_type: str) -> dict[str, Any]:
    """config.json fields vLLM's score/rerank loader reads for this export."""
    if contract.family != "gpt":
        return {}
    out: dict[str, Any] = {"use_sep_token": False}
    if head == "yes_no":
        # vLLM: score.weight = lm_head[id(tokens[1])] - lm_head[id(tokens[0])], one label,
        # token strings resolved with tokenizer.convert_tokens_to_ids.
        no, yes = tokenizer.convert_ids_to_tokens([contract.no_token_id, contract.yes_token_id])
        out.update(classifier_from_token=[no, yes], method="from_2_way_softmax")
        if model_type == "qwen3":
            out["is_original_qwen3_reranker"] = True
    return out


def serving_notes(contract: ScoringContract, head: str, architecture: str) -> dict[str, Any]:
    """The ``serving`` section of an export's scoring.json: how each library or server scores it."""
    if contract.family != "gpt":
        return {
            "template": None,
            "transformers": f"{architecture}: logits[:, 0] of tokenizer(query, document) is "
                            "megarank's score",
            "sentence_transformers": "CrossEncoder(DIR).predict(pairs, "
                                     "activation_fn=torch.nn.Identity()) is megarank's score "
                                     "(its default applies a sigmoid)",
            "vllm": "vllm serve DIR --runner pooling; /score and /rerank apply a sigmoid",
            "tei": "text-embeddings-router --model-id DIR; /rerank with raw_scores=true is "
                   "megarank's score (XLM-RoBERTa and BERT classifiers)",
            "exact": "pairs within max_length: each of them tokenizes the pair as megarank does; "
                     "longer ones are cut by each one's own rule, not 'query to "
                     "max_query_length, then the document'",
        }
    chat = contract.pair_format == "chat"
    score = ("logit(yes) - logit(no) at the last token" if head == "yes_no"
             else "logits[:, 0]")
    return {
        "template": f"{TEMPLATE_FILE} (also the tokenizer's chat_template): the prompt over "
                    "messages with roles 'query' and 'document'; an 'instruction' variable "
                    f"overrides the default instruction ({contract.instruction!r})",
        "transformers": f"{architecture}: render the template, tokenize with "
                        f"add_special_tokens=False, pad left; {score} is megarank's score",
        "sentence_transformers": "CrossEncoder(DIR) renders the same template (roles query, "
                                 "document); predict(..., activation_fn=torch.nn.Identity()) "
                                 "is megarank's score",
        "vllm": "vllm serve DIR --runner pooling --chat-template DIR/" + TEMPLATE_FILE
                + ("" if head == "classifier" else " --hf_overrides '{\"architectures\": [\""
                   + architecture.replace("ForCausalLM", "ForSequenceClassification")
                   + "\"]}'")
                + "; /score and /rerank give sigmoid(megarank's score)",
        "tei": "not served: text-embeddings-inference takes encoder classifiers only and "
               "applies no template",
        "exact": ("pairs within max_length, with a tokenizer without BOS: the template "
                  "rendered and tokenized whole gives megarank's tokens (prefix and suffix "
                  "end on special tokens). Longer pairs: megarank cuts the end of the pair "
                  "text and keeps the suffix; the others cut by their own rule."
                  if chat else
                  "approximate: megarank tokenizes the template's pieces, query and document "
                  "apart; rendered whole, tokens at those boundaries can merge differently. "
                  "Score the exact way with megarank itself."),
    }
