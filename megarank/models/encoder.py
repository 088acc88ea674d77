"""A BERT encoder on megatron-core parallel layers that reproduces Hugging Face ``BertModel``
(and ``RobertaModel`` / ``XLMRobertaModel``: the same layers, positions offset by
pad_token_id + 1).

HF BERT is post-LayerNorm (norm after each residual add), with learned absolute positions,
token-type embeddings and an embedding LayerNorm. megatron-core's BertModel is pre-LayerNorm, so the
layer here reorders megatron's own submodules; weights stay in megatron's parallel linears, so tensor
and pipeline parallelism work unchanged.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megarank.models.norms import layer_norm_class


class PostLNTransformerLayer(TransformerLayer):
    """x -> LN(x + Attn(x)) -> LN(h + MLP(h)): HF ``BertLayer`` order."""

    def __init__(self, config: TransformerConfig, submodules, *args, **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        norm = layer_norm_class(config.normalization)
        # HF: attention.output.LayerNorm and output.LayerNorm.
        self.post_attention_layernorm = norm(config, config.hidden_size, config.layernorm_epsilon)
        self.post_mlp_layernorm = norm(config, config.hidden_size, config.layernorm_epsilon)
        self.pooled = None  # megarank.models.pooling.PooledRows: compute those rows only

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
        **unused: object,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states [s, b, h] -> ([s, b, h], None), as TransformerBlock expects; with
        ``pooled`` set, ([1, n, h], None): the pooled rows only (megarank.models.pooling)."""
        attn = self.self_attention(
            hidden_states, attention_mask=attention_mask, packed_seq_params=packed_seq_params
        )
        if self.pooled is not None:
            hidden_states = self.pooled.select(hidden_states)
        with self.bias_dropout_add_exec_handler():
            h = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attn, hidden_states, self.hidden_dropout
            )
        h = self.post_attention_layernorm(h)
        mlp = self.mlp(h)
        with self.bias_dropout_add_exec_handler():
            out = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp, h, self.hidden_dropout
            )
        return self.post_mlp_layernorm(out), None


class BertEmbeddings(MegatronModule):
    """word (vocab-parallel) + position + token type -> LayerNorm -> dropout, as HF BertEmbeddings.

    ``max_positions`` 0: no absolute positions; ``type_vocab_size`` 0: no token types (DeBERTa-v3).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_positions: int,
                 type_vocab_size: int, position_offset: int = 0) -> None:
        super().__init__(config=config)
        # RoBERTa / XLM-R: the first token's position id is pad_token_id + 1.
        self.position_offset = position_offset
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            vocab_size, config.hidden_size, init_method=config.init_method, config=config
        )
        self.position_embeddings = (torch.nn.Embedding(max_positions, config.hidden_size)
                                    if max_positions else None)
        self.token_type_embeddings = (torch.nn.Embedding(type_vocab_size, config.hidden_size)
                                      if type_vocab_size else None)
        if config.perform_initialization:
            for table in (self.position_embeddings, self.token_type_embeddings):
                if table is not None:
                    config.init_method(table.weight)
        self.layernorm = layer_norm_class(config.normalization)(
            config, config.hidden_size, config.layernorm_epsilon
        )
        self.dropout = torch.nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, token_type_ids [b, s] -> [s, b, h]. ``position_ids`` [b, s]: each token's
        position in its own pair (packed rows); None: 0..s-1 in every row."""
        # Right padding: real tokens are positions 0..n-1 of their row, so this equals HF RoBERTa's
        # cumulative count of non-padding tokens on every real token (padding is masked).
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids + self.position_offset)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.layernorm(x.transpose(0, 1).contiguous())  # [s, b, h]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)


class BertBackbone(MegatronModule):
    """Embeddings (first stage) + post-LN layers of this stage; [s, b, h] hidden states out."""

    def __init__(self, config: TransformerConfig, layer_spec: ModuleSpec, vocab_size: int,
                 max_positions: int, type_vocab_size: int, pre_process: bool,
                 post_process: bool, position_offset: int = 0) -> None:
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embeddings = BertEmbeddings(config, vocab_size, max_positions, type_vocab_size,
                                             position_offset)
        # Post-LN layers end in a norm already: no final LayerNorm (HF has none either).
        self.encoder = TransformerBlock(
            config, layer_spec, post_layer_norm=False, pre_process=pre_process,
            post_process=post_process,
        )

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Pipeline stages > 0 take their input from the previous stage, not the embeddings."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor, packed=None) -> torch.Tensor:
        """[b, s] ids and mask (1 = token) -> hidden states [s, b, h] of this stage.
        ``packed`` (megarank.data.packing.PackedPairs): one row of pairs end to end, attention
        kept inside each pair by its segments instead of a padding mask."""
        if packed is not None:
            x = (self.embeddings(input_ids, token_type_ids, packed.position_ids)
                 if self.pre_process else None)
            return self.encoder(hidden_states=x, attention_mask=None, packed_seq_params=packed)
        # megatron convention: True where attention is NOT allowed; [b, 1, 1, s] broadcasts.
        mask = (attention_mask == 0)[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids) if self.pre_process else None
        return self.encoder(hidden_states=x, attention_mask=mask)
