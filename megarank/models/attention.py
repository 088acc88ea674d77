"""Core attention through PyTorch's ``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the [b*np, sq, sk] score matrix with
baddbmm and a masked softmax; SDPA picks a flash / memory-efficient kernel on recent GPUs and a
fused math kernel on the CPU. It is the core attention of the local layer specs whenever Transformer
Engine is not used. Same interface as megatron's core attention: inputs are
[s, b, heads, head_dim], the output is [s, b, heads * head_dim].

Packed rows (megarank.data.packing; ``packed_seq_params`` a ``PackedPairs``): one row of pairs
laid end to end, attention kept inside each pair. On CUDA, with no attention dropout, that is
flash varlen attention (``torch.nn.attention.varlen.varlen_attn``) over the segment boundaries;
elsewhere (the CPU, dropout, a torch without varlen) the tokens are gathered into a
[segments, longest] layout, attended in one batched SDPA call with a key mask, and gathered back.
Both compute exactly what the padded rows would.

Attention dropout on the CPU (training with ``attention_dropout`` > 0): SDPA then runs its math
kernel and draws a 32-bit random number per attention probability. :func:`attend` computes those
calls itself, with megarank.models.dropout's 16-bit draws (``benchmarks/cpu_dropout.py``: 0.73-0.95
of SDPA's time for MiniLM's 16 x 12 x 128 x 128 probabilities, forward and backward, one thread).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megarank.models.dropout import kept_mask, times_kept

_VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # flash kernels: half precision only
_VARLEN_DEVICES = ("cuda",)  # torch's varlen_attn has no CPU kernel


@functools.cache
def varlen_attention() -> tuple[Callable | None, frozenset[str]]:
    """torch's flash attention over packed variable-length sequences (torch >= 2.10, CUDA
    only) and the parameters it takes, or (None, {}). Looked up on the first packed CUDA
    call: the module imports torch's dynamo (~1 s), which a CPU process never needs. This
    torch's varlen_attn takes causality as ``window_size`` (2.11: (-1, 0) is causal) or,
    before it, ``is_causal``; grouped-query attention as ``enable_gqa`` (2.13) or not at all."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - older torch
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
           attn_mask: torch.Tensor | None, dropout_p: float, scale: float, is_causal: bool = False,
           enable_gqa: bool = False, tp_rng: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over [b, heads, s, d], except attention dropout on the
    CPU, which :func:`_dropout_attention` computes (see the module docstring). ``tp_rng``: heads
    are split over TP ranks, so dropout draws from megatron's TP-distinct RNG stream."""
    if dropout_p > 0.0 and tp_rng:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return attend(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                          is_causal=is_causal, enable_gqa=enable_gqa)
    if dropout_p > 0.0 and q.device.type == "cpu":
        return _dropout_attention(q, k, v, attn_mask, dropout_p, scale, is_causal, enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None, dropout_p: float, scale: float,
                       is_causal: bool, enable_gqa: bool) -> torch.Tensor:
    """softmax(q k^T * scale + mask) with dropout, times v: SDPA's math, with the mask of
    :func:`kept_mask`. Like SDPA's math kernel on the CPU, half-precision inputs are computed in
    fp32 and the output is cast back.

    A boolean mask is added to the scores as a bias of 0 (may attend) or the lowest float (may
    not), not filled in: an add with a broadcast bias is one vectorised pass whose backward is
    free, where a masked fill and its backward are two slow passes (``benchmarks/cpu_dropout.py``).
    The lowest float rather than -inf, so a row with every key masked (only padding queries have
    one) attends uniformly instead of producing NaN (the score is lost in the rounding: the sum
    is the lowest float); real rows are unchanged (their masked terms are exactly 0 after
    softmax, the same bits as a fill). The dropped probabilities are zeroed by
    :func:`times_kept`, a product with the bool mask."""
    dtype = q.dtype
    q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q, k, v))
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    allowed = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else None
    if is_causal:
        sq, sk = scores.shape[-2:]
        tri = torch.ones(sq, sk, dtype=torch.bool).tril()
        allowed = tri if allowed is None else tri & allowed
    if allowed is not None:  # one bias for both masks: two lowest floats would add to -inf
        scores.add_(torch.zeros(allowed.shape, dtype=scores.dtype).masked_fill_(
            allowed.logical_not(), torch.finfo(scores.dtype).min))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    kept, rate = kept_mask(tuple(probs.shape), dropout_p)
    # softmax's backward reads its output: the dropout is not in place
    ctx = torch.matmul(times_kept(probs, kept), v)
    return (ctx * (1.0 / (1.0 - rate))).to(dtype)


def _segments(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """A packed row's tokens [T, h, d] -> [S, h, L, d] by ``gather`` [S, L] (T, one past the
    row, stands for "no token" and reads a zero row)."""
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return x[gather].permute(0, 2, 1, 3)


def _varlen_causal_kwargs(causal: bool, params: frozenset[str]) -> dict:
    if "window_size" in params:
        return {"window_size": (-1, 0) if causal else (-1, -1)}
    return {"is_causal": causal}


class SDPAttention(MegatronModule):
    """Drop-in core attention (``SelfAttentionSubmodules.core_attention``) using SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **unused: object,  # cp_comm_type, pg_collection: no context parallelism here
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.pooled = None  # megarank.models.pooling.PooledRows: queries of those rows only

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np*hn].

        ``attention_mask`` is megatron's convention: bool, True where attention is NOT allowed,
        broadcastable to [b, 1, sq, sk]. Causal masking comes from the mask type, not a tensor.
        """
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention supports no attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if self.pooled is not None:
            return self._pooled(query, key, value, attention_mask, packed_seq_params,
                                mask_type == AttnMaskType.causal)
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, mask_type)
        sq, b, np_, hn = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask  # SDPA: True = may attend
        elif attention_mask is not None and causal:
            # Causal plus padding: fold both into one boolean mask.
            sk = k.shape[2]
            tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            mask = tri & ~attention_mask
            causal = False
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(
            attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        ctx = attend(q, k, v, tp_rng=not self.config.sequence_parallel, **kwargs)
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed,
                mask_type: AttnMaskType) -> torch.Tensor:
        """One packed row [T, 1, heads, d] -> [T, 1, heads * d], attention inside each segment."""
        t, b, np_, hn = query.shape
        if b != 1:
            raise ValueError(f"a packed micro-batch is one row, got {b}")
        causal = mask_type == AttnMaskType.causal
        dropout_p = self.dropout_p if self.training else 0.0
        q, k, v = query[:, 0], key[:, 0], value[:, 0]  # [T, heads, d]
        varlen_attn, params = (varlen_attention() if q.device.type in _VARLEN_DEVICES
                               and dropout_p == 0.0 and q.dtype in _VARLEN_DTYPES
                               else (None, frozenset()))
        if varlen_attn is not None:
            kwargs = _varlen_causal_kwargs(causal, params)
            if k.shape[1] != np_ and "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            elif k.shape[1] != np_:  # grouped-query attention, a torch without enable_gqa
                k = k.repeat_interleave(np_ // k.shape[1], dim=1)
                v = v.repeat_interleave(np_ // v.shape[1], dim=1)
            cu = packed.cu_seqlens
            ctx = varlen_attn(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen,
                              scale=self.softmax_scale, **kwargs)
            return ctx.reshape(t, 1, np_ * hn)
        # Unpack: [T, h, d] -> [S, h, L, d] (a zero row stands for "no token"), batched SDPA.
        gather, keep = packed.gather_index, packed.key_mask  # [S, L]
        s_, l_ = gather.shape
        qs, ks, vs = (_segments(x, gather) for x in (q, k, v))
        mask = keep[:, None, None, :]  # [S, 1, 1, L]: may attend to real keys only
        if causal:
            mask = mask & torch.ones(l_, l_, dtype=torch.bool, device=q.device).tril()
        kwargs = dict(attn_mask=mask, dropout_p=dropout_p, scale=self.softmax_scale,
                      enable_gqa=ks.shape[1] != qs.shape[1])
        ctx = attend(qs, ks, vs, tp_rng=not self.config.sequence_parallel, **kwargs)
        # [S, h, L, d] -> [S * L, h * d] -> the row's tokens in order.
        ctx = ctx.permute(0, 2, 1, 3).reshape(s_ * l_, np_ * hn)
        return ctx[packed.scatter_index].reshape(t, 1, np_ * hn)

    def _pooled(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, packed, causal: bool) -> torch.Tensor:
        """The pooled rows' queries only (megarank.models.pooling) -> context [1, n, np*hn].

        Each pooled query attends to the keys its row would have let it see: its own row's
        real tokens (padding mask), its own pair's (packed), and with causal attention only
        those at or before it."""
        rows = self.pooled
        np_, hn = query.shape[2], query.shape[3]
        n = rows.count
        if packed is None:
            s, b = query.shape[:2]
            if b != n:
                raise ValueError(f"{n} pooled rows for a micro-batch of {b}")
            q = rows.select(query)[0][:, :, None]  # [b, np, 1, hn]
            k, v = (t.permute(1, 2, 0, 3) for t in (key, value))  # [b, ng, s, hn]
            allowed = None if attention_mask is None else ~attention_mask  # [b, 1, 1, s]
            if causal:
                before = torch.arange(s, device=q.device)[None, :] <= rows.index[:, None]
                allowed = before[:, None, None] if allowed is None else allowed & before[:, None, None]
        else:
            if n > packed.num_segments:
                raise ValueError(f"{n} pooled rows for {packed.num_segments} packed segments")
            q = rows.select(query)[0][:, :, None]  # [n, np, 1, hn]
            gather = packed.gather_index[:n]  # pair j is segment j
            k, v = _segments(key[:, 0], gather), _segments(value[:, 0], gather)  # [n, ng, L, hn]
            allowed = packed.key_mask[:n]
            if causal:
                within = rows.index - packed.cu_seqlens[:n].to(rows.index.dtype)
                allowed = allowed & (torch.arange(gather.shape[1], device=q.device)[None, :]
                                     <= within[:, None])
            allowed = allowed[:, None, None]  # [n, 1, 1, L]
        dropout_p = self.dropout_p if self.training else 0.0
        ctx = attend(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale,
                     enable_gqa=k.shape[1] != np_, tp_rng=not self.config.sequence_parallel)
        return ctx.reshape(1, n, np_ * hn)  # [n, np, 1, hn] -> [1, n, np*hn]
