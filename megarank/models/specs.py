"""Layer specs: which megatron-core modules make up a transformer layer, per family and kernels.

``local``: megatron's own parallel linears and norms with SDPA core attention (works everywhere).
``te``: Transformer Engine's fused LayerNorm+linear and fused attention (CUDA + TE installed).
``auto`` takes ``te`` when it is usable and says why it did not otherwise.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megarank.models.attention import SDPAttention
from megarank.models.deberta import (
    DisentangledAttention,
    DisentangledSelfAttention,
    RelativePositions,
)
from megarank.models.decoder import PreNormTransformerLayer
from megarank.models.dropout import get_bias_dropout_add
from megarank.models.encoder import PostLNTransformerLayer


@dataclass(frozen=True)
class KernelChoice:
    """Which kernels a run uses, and why (printed at start-up)."""

    name: str
    reason: str


def te_available() -> bool:
    """Transformer Engine is importable (it never is on a CPU-only machine)."""
    return importlib.util.find_spec("transformer_engine") is not None


def select_kernels(requested: str, device: torch.device) -> KernelChoice:
    """Resolve ``auto``/``te``/``local`` against what this process can use."""
    if requested not in ("auto", "te", "local"):
        raise ValueError(f"trainer.kernels ({requested!r}) must be one of auto, te, local")
    if requested == "local":
        return KernelChoice("local", "trainer.kernels=local: megatron local layers + SDPA")
    if device.type != "cuda":
        if requested == "te":
            raise ValueError("trainer.kernels=te needs a CUDA device")
        return KernelChoice("local", "no CUDA device: megatron local layers + SDPA")
    if not te_available():
        if requested == "te":
            raise ValueError("trainer.kernels=te but transformer_engine is not installed")
        return KernelChoice("local", "transformer_engine not installed: local layers + SDPA")
    return KernelChoice("te", "CUDA and transformer_engine present: TE fused layers")


def apex_available() -> bool:
    """NVIDIA apex (fused LayerNorm / Adam) is importable."""
    return importlib.util.find_spec("apex") is not None


def check_kernel_support(sequence_parallel: bool, kernels: KernelChoice) -> None:
    """Refuse settings the chosen kernels cannot run, before any model is built."""
    if sequence_parallel and kernels.name != "te" and not apex_available():
        raise ValueError(
            "parallel.sequence_parallel needs Transformer Engine (trainer.kernels=te) or apex: "
            "megatron's torch LayerNorm does not support sequence parallelism "
            f"(kernels here: {kernels.name}, {kernels.reason})"
        )


def gpt_layer_spec(normalization: str, qk_layernorm: bool, kernels: str) -> ModuleSpec:
    """A pre-norm decoder layer (Llama/Qwen): megatron's GPT spec, SDPA attention and
    megarank.models.dropout's residual dropout when local."""
    if kernels == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm,
                                                  normalization=normalization))
    spec.module = PreNormTransformerLayer
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attn_bda = spec.submodules.mlp_bda = get_bias_dropout_add
    return spec


def bert_layer_spec(kernels: str) -> ModuleSpec:
    """A post-LayerNorm encoder layer that computes exactly what HF ``BertLayer`` computes.

    The pre-norm slots of megatron's layer stay empty (IdentityOp); the two LayerNorms are applied
    after each residual add by :class:`megarank.models.encoder.PostLNTransformerLayer`.
    """
    if kernels == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )

        col, row, core = TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        col, row, core = ColumnParallelLinear, RowParallelLinear, SDPAttention
    return ModuleSpec(
        module=PostLNTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col, core_attention=core, linear_proj=row,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def deberta_layer_spec(relative: RelativePositions, pos_att_type: tuple[str, ...],
                       share_att_key: bool = True) -> ModuleSpec:
    """BERT's post-LN layer with DeBERTa's disentangled attention reading ``relative``.

    Always megatron's local linears: TE's fused attention takes no per-layer position terms, and
    its linears would gather the position table along the sequence under sequence parallelism.
    """
    spec = bert_layer_spec("local")
    attention = spec.submodules.self_attention
    spec.submodules.self_attention = ModuleSpec(
        module=DisentangledSelfAttention,
        params={**attention.params, "relative": relative, "pos_att_type": tuple(pos_att_type),
                "share_att_key": share_att_key},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=DisentangledAttention,
            linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp,
        ),
    )
    return spec


# Transformer Engine's spec fuses each decoder pre-norm into the linear after it; its parameter
# is then named after that linear. Checkpoints are written with the local spec's names, so a
# checkpoint (training, resume, model.init_from) loads whichever kernels wrote or read it.
TE_FUSED_NORMS: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_name(name: str) -> str:
    """A parameter or checkpoint key with TE's fused-norm name replaced by the local spec's."""
    for te, local in TE_FUSED_NORMS.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name
