"""A decoder backbone (Llama / Qwen style) from megatron-core GPT parts, without the LM output layer.

megatron-core's GPTModel always projects its last stage onto the vocabulary. A reranker scores a
pair from one hidden state, so the backbone here is GPTModel's embedding + RoPE + TransformerBlock
(with final norm) and stops at hidden states; the scoring head lives in ``heads.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.x RoPE scaling (HF ``rope_type: llama3``): frequencies whose wavelength exceeds
    ``original_max_positions / low_freq_factor`` are divided by ``factor``, those below
    ``original_max_positions / high_freq_factor`` kept, and the band between blended smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int

    def __call__(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Scaled inverse frequencies [d/2], computed as transformers' _compute_llama3_parameters."""
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


class PreNormTransformerLayer(TransformerLayer):
    """megatron's pre-norm layer, which can also compute only the rows a head pools
    (``pooled``, megarank.models.pooling): keys and values of every row, the rest for those
    rows, output [1, n, h]."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pooled = None

    def forward(self, *args, **kwargs):
        if self.pooled is None:
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"]
        attn = self.self_attention(
            self.input_layernorm(hidden_states), attention_mask=kwargs.get("attention_mask"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            packed_seq_params=kwargs.get("packed_seq_params"),
        )
        with self.bias_dropout_add_exec_handler():
            h = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attn, self.pooled.select(hidden_states), self.hidden_dropout
            )
        return self._forward_mlp(h), None


class DecoderBackbone(MegatronModule):
    """Token embedding (first stage) + causal layers of this stage + final norm (last stage)."""

    def __init__(self, config: TransformerConfig, layer_spec: ModuleSpec, vocab_size: int,
                 max_positions: int, rotary_base: float, pre_process: bool,
                 post_process: bool, rope_scaling: Llama3RopeScaling | None = None) -> None:
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=vocab_size, max_sequence_length=max_positions,
                position_embedding_type="rope",
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        if rope_scaling is not None:
            # megatron's own rope_scaling fixes the band limits at Llama 3.1's (1, 4, 8192);
            # Llama 3.2/3.3 and scaled fine-tunes set their own.
            self.rotary_pos_emb.inv_freq = rope_scaling(self.rotary_pos_emb.inv_freq)
        self.decoder = TransformerBlock(
            config, layer_spec, pre_process=pre_process, post_process=post_process
        )

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Pipeline stages > 0 take their input from the previous stage, not the embedding."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, packed=None) -> torch.Tensor:
        """[b, s] ids -> hidden states [s, b, h] of this stage.

        Right padding + causal attention: real tokens never see padding, so no padding mask is
        needed and the causal kernel path stays available. ``attention_mask`` is used only by the
        head (pooling position). ``packed`` (megarank.data.packing.PackedPairs): one row of
        pairs end to end; positions restart in each pair and attention stays inside it.
        """
        b, s = input_ids.shape
        positions = (packed.position_ids if packed is not None
                     else torch.arange(s, device=input_ids.device)[None].expand(b, s))
        x = None
        if self.pre_process:
            x = self.embedding(input_ids=input_ids, position_ids=positions)
        if packed is None:
            rotary = self.rotary_pos_emb(s)
        else:  # each token's own position: [s, 1, 1, d] frequencies gathered by position
            rotary = self.rotary_pos_emb(packed.max_seqlen)[positions[0]]
        return self.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary,
                            packed_seq_params=packed)
