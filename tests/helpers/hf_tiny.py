"""Tiny random-weight Hugging Face models saved as model directories: BERT, RoBERTa,
XLM-RoBERTa and DeBERTa-v3 (with tokenizers of their own kind, trained here in seconds), Llama
(plain and with Llama 3 RoPE scaling), Mistral, Qwen2 and Qwen3."""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path

import torch
from transformers import AutoTokenizer

from megarank.config.schema import ASSETS

TOKENIZER = ASSETS / "tokenizers" / "bert-uncased"
TOKENS = 30522  # the shipped tokenizer's; token id 0 is [PAD]
# A few spare rows: transformers 5 loads this tokenizer as Qwen2Tokenizer in a qwen2 directory,
# which adds <|endoftext|>; it also makes the vocabulary no multiple of the padding.
VOCAB = 30528

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=96, max_position_embeddings=128, pad_token_id=0)

# RoBERTa-style encoders: their own tokenizers (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), a
# model vocabulary with a few spare rows, and 128 usable positions after the pad_token_id + 1
# offset.
ENC_TOKENS = 1000
ENC_VOCAB = 1003
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
ROBERTA_COMMON = dict(COMMON, vocab_size=ENC_VOCAB, max_position_embeddings=130, pad_token_id=1,
                      bos_token_id=0, eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ROBERTA_KINDS = ("xlm_roberta", "roberta")

# DeBERTa-v3 settings at a tiny scale: no absolute positions, no token types, relative positions
# exact up to +-4 and log-bucketed beyond (test rows reach 23 apart), the relative table
# LayerNorm'ed and projected by the content query and key weights, both position terms. Its
# tokenizer: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=4, as deberta-v3's first ids.
DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
DEBERTA_V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=-1,
                  norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                  position_biased_input=False, type_vocab_size=0)
# Weights of std 0.1: at HF's 0.02 attention is near uniform and dropping a position term moves
# the scores by ~5e-6, under the parity tolerance; at 0.1 by ~3e-2.
DEBERTA_COMMON = dict(COMMON, vocab_size=ENC_VOCAB, pad_token_id=0, layer_norm_eps=1e-7,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      pooler_hidden_size=64, pooler_dropout=0.0, initializer_range=0.1,
                      **DEBERTA_V3)

# Llama 3 RoPE scaling with its band limits moved to this model's scale, so that the head's 8
# frequencies fall in all three bands (kept, blended, divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _training_text() -> list[str]:
    """Cranfield's documents (shipped), in lower and title case, to train tiny tokenizers on."""
    from megarank.config.schema import ASSETS

    path = ASSETS / "collections" / "cranfield" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:400]]
    return texts + [t.title() for t in texts[:100]]


@functools.cache
def encoder_tokenizer(kind: str):
    """An XLM-R tokenizer (SentencePiece-style Unigram, as bge-reranker's) or a RoBERTa one
    (byte-level BPE) with ENC_TOKENS tokens, trained on Cranfield."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizer, XLMRobertaTokenizer

    if kind == "xlm_roberta":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(_training_text(), trainers.UnigramTrainer(
            vocab_size=ENC_TOKENS, special_tokens=ROBERTA_SPECIALS, unk_token="<unk>",
            initial_alphabet=list(string.printable)))
        vocab = json.loads(tok.to_str())["model"]["vocab"]
        return XLMRobertaTokenizer(vocab=[tuple(v) for v in vocab])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=ENC_TOKENS, special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    return RobertaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


@functools.cache
def deberta_tokenizer():
    """A DebertaV2Tokenizer (SentencePiece-style Unigram, as deberta-v3's) with ENC_TOKENS
    tokens, trained on Cranfield."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import DebertaV2Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(_training_text(), trainers.UnigramTrainer(
        vocab_size=ENC_TOKENS, special_tokens=DEBERTA_SPECIALS, unk_token="[UNK]",
        initial_alphabet=list(string.printable)))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return DebertaV2Tokenizer(vocab=[tuple(v) for v in vocab])


def make_config(kind: str):
    """The HF config of a tiny model of ``kind``: bert, xlm_roberta, roberta, deberta,
    deberta_unshared, llama, llama3, mistral, qwen2, qwen3 (+ _tied)."""
    from transformers import (
        BertConfig,
        DebertaV2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
        RobertaConfig,
        XLMRobertaConfig,
    )

    tied = kind.endswith("_tied")
    kind = kind.removesuffix("_tied")
    if kind == "bert":
        return BertConfig(**COMMON, type_vocab_size=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    if kind == "xlm_roberta":
        return XLMRobertaConfig(**ROBERTA_COMMON)
    if kind == "roberta":
        return RobertaConfig(**ROBERTA_COMMON)
    if kind == "deberta":
        return DebertaV2Config(**DEBERTA_COMMON)
    if kind == "deberta_unshared":  # position projections of their own (pos_key/query_proj)
        return DebertaV2Config(**dict(DEBERTA_COMMON, share_att_key=False))
    decoder = dict(COMMON, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if kind == "llama":
        return LlamaConfig(**decoder)
    if kind == "llama3":
        return LlamaConfig(**dict(decoder, rope_parameters=dict(LLAMA3_ROPE)))
    if kind == "mistral":
        # A window longer than any test sequence: full causal attention, as megarank computes.
        return MistralConfig(**decoder, sliding_window=128)
    if kind == "qwen2":
        return Qwen2Config(**decoder)
    if kind == "qwen3":
        # head_dim != hidden / heads, as in real Qwen3 models.
        return Qwen3Config(**decoder, head_dim=24)
    raise ValueError(kind)


def edit_config(model_dir: Path, **changes) -> Path:
    """Change fields of ``model_dir``'s config.json in place (a value of None removes the
    field); returns the file's path."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return path


def save_tiny(kind: str, root: Path, causal_lm: bool = False, seed: int = 0,
              changes: dict | None = None, name: str | None = None) -> Path:
    """Save a tiny random model (sequence classifier, or causal LM) with the shipped tokenizer,
    or its kind's; ``changes``: config fields set on ``make_config(kind)``, saved as ``name``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = make_config(kind)
    for key, value in (changes or {}).items():
        setattr(cfg, key, value)
    out = root / (name or f"{kind}{'_lm' if causal_lm else ''}")
    torch.manual_seed(seed)
    if causal_lm:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    # Non-trivial norms and biases, so a mapping mistake cannot hide behind ones and zeros.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    if kind in ROBERTA_KINDS:
        encoder_tokenizer(kind).save_pretrained(out)
    elif kind.startswith("deberta"):
        deberta_tokenizer().save_pretrained(out)
    else:
        AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    return out


def random_batch(n: int = 6, max_len: int = 24, seed: int = 1,
                 kind: str = "bert") -> dict[str, torch.Tensor]:
    """Right-padded ids of mixed lengths for a model of ``kind``: no real token is the pad id
    (0, or 1 for RoBERTa-style encoders); RoBERTa- and DeBERTa-style ids stay within their
    tokenizer and their token types are all 0; BERT gets two segments."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    roberta = kind in ROBERTA_KINDS
    low, high, pad = (5, ENC_TOKENS, 1) if roberta else (1000, TOKENS, 0)
    if kind.startswith("deberta"):
        low, high, pad = 5, ENC_TOKENS, 0
    ids = torch.randint(low, high, (n, max_len), generator=g)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, pad)
    types = ((torch.arange(max_len)[None] >= (lengths // 2)[:, None]).long()) * mask
    if kind != "bert":
        types = torch.zeros_like(types)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "last": lengths - 1}


def hf_inputs(kind: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments an HF model of ``kind`` takes for ``batch``."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if kind == "bert":
        kw["token_type_ids"] = batch["token_type_ids"]
    return kw


# Qwen3's chat template, reduced to what a reranker prompt uses: turns, the generation prompt, and
# the empty think block Qwen3 writes when thinking is off (Qwen3-Reranker's suffix).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@functools.cache
def chat_tokenizer():
    """A Qwen2Tokenizer (Qwen3's class: byte-level BPE, Qwen's pre-tokenizer, no BOS) trained
    on Cranfield, with Qwen's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>), <think>
    and </think>, "yes" and "no" as single tokens, and a Qwen-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = _training_text() + ["yes", "no", "yes no"] * 50  # "yes"/"no" alone: one token each
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    qwen.add_tokens(["<think>", "</think>"])
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    return qwen


def save_qwen3_reranker(root: Path, seed: int = 0, tied: bool = True) -> Path:
    """A tiny random Qwen3ForCausalLM with the chat-style tokenizer, saved as a model directory:
    tied embeddings as Qwen3-Reranker-0.6B, or (``tied=False``) its own LM output layer as
    Qwen3-Reranker-8B."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tok = chat_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok) + 5, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      intermediate_size=96, max_position_embeddings=512, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif tied and name.endswith("embed_tokens.weight"):
                p.mul_(10.0)  # yes/no logits far enough apart that p(yes) is not always 1/2
            elif not tied and name.endswith("lm_head.weight"):
                p.mul_(3.0)  # yes/no logits apart enough to rank by, small enough for bf16
    out = root / ("qwen3_reranker" if tied else "qwen3_reranker_untied")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
