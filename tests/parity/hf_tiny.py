"""Tiny random-weight Hugging Face models (BERT, Llama, Qwen2, Qwen3) saved as model directories."""

from __future__ import annotations

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


def make_config(kind: str):
    """The HF config of a tiny model of ``kind``: bert, llama, qwen2, qwen3 (+ _tied)."""
    from transformers import BertConfig, LlamaConfig, Qwen2Config, Qwen3Config

    tied = kind.endswith("_tied")
    kind = kind.removesuffix("_tied")
    if kind == "bert":
        return BertConfig(**COMMON, type_vocab_size=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    decoder = dict(COMMON, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                   rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if kind == "llama":
        return LlamaConfig(**decoder)
    if kind == "qwen2":
        return Qwen2Config(**decoder)
    if kind == "qwen3":
        # head_dim != hidden / heads, as in real Qwen3 models.
        return Qwen3Config(**decoder, head_dim=24)
    raise ValueError(kind)


def save_tiny(kind: str, root: Path, causal_lm: bool = False, seed: int = 0) -> Path:
    """Save a tiny random model (sequence classifier, or causal LM) with the shipped tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = make_config(kind)
    torch.manual_seed(seed)
    if causal_lm:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    # Non-trivial norms and biases, so a mapping mistake cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = root / f"{kind}{'_lm' if causal_lm else ''}"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    return out


def random_batch(n: int = 6, max_len: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ids of mixed lengths (no real token is the pad id 0), with segments."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    ids = torch.randint(1000, TOKENS, (n, max_len), generator=g)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    types = ((torch.arange(max_len)[None] >= (lengths // 2)[:, None]).long()) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "last": lengths - 1}
