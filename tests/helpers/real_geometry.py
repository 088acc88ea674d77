"""The published config.json geometry of the models the 7B/8B experiment presets start from,
written into a directory that holds nothing else: enough for ``megarank plan`` and the Slurm dry
run to size the model, with no weights (and no hub) needed.

Values from the models' config.json files: Qwen/Qwen3-Reranker-8B (Qwen3ForCausalLM),
Qwen/Qwen2.5-7B-Instruct (Qwen2ForCausalLM), meta-llama/Llama-3.1-8B (LlamaForCausalLM, Llama-3
RoPE scaling). PUBLISHED_PARAMS: the parameter counts their model cards state (with the LM
output layer).
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS: dict[str, dict] = {
    "Qwen3-Reranker-8B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151669,
        "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "use_sliding_window": False, "torch_dtype": "bfloat16",
    },
    "Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
        "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
        "mlp_bias": False, "attention_bias": False, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "torch_dtype": "bfloat16",
    },
}

# experiment preset -> the model directory it is run with here
PRESETS = {
    "qwen3_reranker_8b": "Qwen3-Reranker-8B",
    "qwen2p5_7b_classifier": "Qwen2.5-7B-Instruct",
    "llama3_8b_classifier": "Llama-3.1-8B",
}

PUBLISHED_PARAMS = {"Qwen3-Reranker-8B": 8.19e9, "Qwen2.5-7B-Instruct": 7.61e9,
                    "Llama-3.1-8B": 8.03e9}


def write_config_only(root: Path, name: str) -> Path:
    """``root/name/config.json`` with the model's published geometry, and nothing else."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIGS[name], indent=1))
    return out
