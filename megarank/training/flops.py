"""FLOPs of a cross-encoder step, counted from the model config, and model FLOPs utilisation.

Convention (the one Megatron-LM and PaLM use for MFU):

- A matmul of an [m, k] by a [k, n] matrix costs ``2 * m * n * k`` FLOPs (a multiply and an add).
- Only matmuls count. Norms, softmax, activations, RoPE, biases, residual adds and the loss are
  ignored: each is O(s * h) per layer against O(s * h^2) for the projections, under 1% at
  h >= 1024. Embedding lookups are gathers and cost 0.
- Training = forward + backward = 3 x forward: the backward computes both the gradient of the
  input and of the weight of every matmul, each as large as the forward one (Narayanan et al.
  2021, "Efficient Large-Scale Language Model Training on GPU Clusters", sec. 5.1).
- Recomputed activations are not counted: these are *model* FLOPs (PaLM, Chowdhery et al. 2022,
  appendix B), so MFU does not rise when a run recomputes more.
- Sequences are counted at their padded length: the GPU does the work on the padding too.
- Every layer is counted whole. megarank's last layer computes only the pooled rows'
  queries, projection and MLP (``trainer.pooled_last_layer``): it does less than this count, and
  MFU compares systems at the same model work, as the full causal square does above.

The model is a backbone without an LM output layer plus a head on ONE pooled token per sequence,
so the head is tiny; the yes/no head uses two rows of the output layer where a full-vocabulary
output layer would cost ``2 * s * h * V`` per sequence (``full_vocab_head=True`` adds that term,
for comparison with LM-style accounting).

Per GPU: ``step_flops(...) / step_seconds / world_size``; pass that to :func:`mfu`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megarank.config.schema import ModelConfig

HEADS = ("classifier", "yes_no")

# Dense BF16 tensor-core peaks in TFLOP/s, no 2:4 sparsity. NVIDIA's datasheets print the sparse
# figure with an asterisk; the dense one is half of it:
#   H100 datasheet (SXM 1,979* / PCIe 1,513* / NVL 1,671*), H200 datasheet (SXM 1,979* /
#   NVL 1,671*), A100 datasheet (624*, SXM and PCIe alike), L40S datasheet (733*),
#   L4 datasheet (242*), A10 datasheet (250*), HGX B200 (4.5 PFLOPS* per GPU).
# Keys are matched as whole words in torch.cuda.get_device_name() (see peak_tflops). The SXM H100
# reports itself as "NVIDIA H100 80GB HBM3", so the bare "H100" entry is the SXM figure.
PEAK_BF16_DENSE_TFLOPS: dict[str, float] = {
    "H100": 989.4,
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "H200 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.05,
    "L4": 121.0,
    "A10": 125.0,
    "B200": 2250.0,
}


def _geometry(model_cfg: ModelConfig) -> tuple[int, int, int, int, int, int]:
    """(L, h, nq, nkv, d, ffn) from a ModelConfig or the composed ``cfg.model``."""
    h, nq = int(model_cfg.hidden_size), int(model_cfg.num_attention_heads)
    nkv = int(model_cfg.num_query_groups or nq)
    d = int(model_cfg.head_dim or h // nq)
    return int(model_cfg.num_layers), h, nq, nkv, d, int(model_cfg.ffn_hidden_size)


def forward_flops_breakdown(model_cfg: ModelConfig, seq_len: int, head: str = "classifier",
                            causal: bool | None = None, full_vocab_head: bool = False,
                            causal_half: bool = False) -> dict[str, float]:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, by part (all layers summed).

    Keys: ``qkv``, ``attention`` (QK^T and AV), ``out_proj``, ``mlp``, ``head`` and
    ``output_layer`` (0 unless ``full_vocab_head``).

    Attention scores: an encoder (bidirectional) computes the full s x s. A causal decoder needs
    only the lower triangle, but Megatron-LM's and PaLM's MFU formulas count the full square, and
    so does this function by default. ``causal_half=True`` counts half of it (s^2 / 2, as
    FlashAttention's benchmarks do for causal masks); it applies only where the model is causal.
    ``causal`` None means causal for the ``gpt`` family and bidirectional for ``bert``.
    """
    if head not in HEADS:
        raise ValueError(f"head ({head!r}) must be one of {', '.join(HEADS)}")
    if seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) must be positive")
    layers, h, nq, nkv, d, ffn = _geometry(model_cfg)
    s = float(seq_len)
    if causal is None:
        causal = model_cfg.family == "gpt"
    square = s * s / 2 if (causal and causal_half) else s * s
    gated = bool(model_cfg.gated_linear_unit)
    per_layer = {
        # [s, h] x [h, nq*d + 2*nkv*d]: queries for every head, keys/values per query group.
        "qkv": 2 * s * h * (nq * d + 2 * nkv * d),
        # QK^T: [s, d] x [d, s] per query head; AV: [s, s] x [s, d] per query head.
        "attention": 2 * square * nq * d + 2 * square * nq * d,
        "out_proj": 2 * s * nq * d * h,  # [s, nq*d] x [nq*d, h]
        # Gated: gate and up [h, ffn] each plus down [ffn, h]; plain: up and down.
        "mlp": 2 * s * h * ffn * (3 if gated else 2),
    }
    if model_cfg.family == "deberta":
        # Position terms: each token's query (c2p) and key (p2c) against every row of the
        # 2*span-row table. The table's own projection runs once per micro-batch, not per
        # sequence, and is left out.
        terms = len(model_cfg.pos_att_type)
        per_layer["attention"] += terms * 2 * s * 2 * _relative_span(model_cfg) * nq * d
    out = {k: layers * v for k, v in per_layer.items()}
    if head == "yes_no":
        out["head"] = 2.0 * h * 2  # the pooled [h] by the two output-layer rows [h, 2]
    elif model_cfg.family in ("bert", "deberta"):
        out["head"] = 2.0 * h * h + 2.0 * h  # pooler Linear(h, h) + tanh/GELU, Linear(h, 1)
    else:
        out["head"] = 2.0 * h  # Linear(h, 1) on the pooled token
    out["output_layer"] = 2 * s * h * int(model_cfg.vocab_size) if full_vocab_head else 0.0
    return out


def _relative_span(model_cfg: ModelConfig) -> int:
    """DeBERTa's span: half the rows of its relative-position table."""
    if model_cfg.position_buckets > 0:
        return int(model_cfg.position_buckets)
    if model_cfg.max_relative_positions >= 1:
        return int(model_cfg.max_relative_positions)
    return int(model_cfg.max_position_embeddings)


def forward_flops_per_sequence(model_cfg: ModelConfig, seq_len: int, head: str = "classifier",
                               causal: bool | None = None, full_vocab_head: bool = False,
                               causal_half: bool = False) -> float:
    """Forward FLOPs of one sequence: the sum of :func:`forward_flops_breakdown`."""
    return sum(forward_flops_breakdown(model_cfg, seq_len, head, causal, full_vocab_head,
                                       causal_half).values())


def train_flops_per_sequence(model_cfg: ModelConfig, seq_len: int, head: str = "classifier",
                             causal: bool | None = None, full_vocab_head: bool = False,
                             causal_half: bool = False) -> float:
    """Forward + backward FLOPs of one sequence: 3 x forward (the backward is 2 x forward)."""
    return 3.0 * forward_flops_per_sequence(model_cfg, seq_len, head, causal, full_vocab_head,
                                            causal_half)


def step_flops(model_cfg: ModelConfig, padded_lengths: list[int] | int, num_sequences: int = 1,
               head: str = "classifier", causal: bool | None = None,
               full_vocab_head: bool = False, causal_half: bool = False,
               training: bool = True) -> float:
    """FLOPs of a step over all ranks: the sum over its sequences (every pair of every group).

    ``padded_lengths`` lists each sequence's padded length (a micro-batch pads to its longest), or
    is one length shared by ``num_sequences`` sequences. ``training=False`` counts the forward only
    (evaluation). Divide by the step time and the world size for FLOP/s per GPU.
    """
    counts = (Counter({padded_lengths: num_sequences}) if isinstance(padded_lengths, int)
              else Counter(padded_lengths))
    per_seq = train_flops_per_sequence if training else forward_flops_per_sequence
    # The cost depends on the length only: count each distinct length once.
    return sum(n * per_seq(model_cfg, s, head, causal, full_vocab_head, causal_half)
               for s, n in counts.items())


def _words(name: str) -> str:
    """Upper case, with runs of spaces, dashes and underscores as one space, padded by spaces."""
    return " " + re.sub(r"[\s_\-]+", " ", name.strip().upper()) + " "


def peak_tflops(device_name: str) -> tuple[float, str] | None:
    """(dense BF16 peak TFLOP/s, the table key that matched) for a CUDA device name, or None.

    Keys match as whole words, so "L4" does not match an L40 and "A10" not an A100 or A10G; of the
    keys that match, the longest (the most specific) wins: "NVIDIA H100 PCIe" -> "H100 PCIe",
    "NVIDIA H100 80GB HBM3" -> "H100".
    """
    name = _words(device_name)
    hits = [k for k in PEAK_BF16_DENSE_TFLOPS if _words(k) in name]
    if not hits:
        return None
    key = max(hits, key=len)
    return PEAK_BF16_DENSE_TFLOPS[key], key


def mfu(achieved_flops_per_s_per_gpu: float, device_name: str) -> tuple[float, str] | None:
    """(model FLOPs utilisation in [0, 1], the table key) for one GPU, or None if unknown."""
    peak = peak_tflops(device_name)
    if peak is None:
        return None
    tflops, key = peak
    return achieved_flops_per_s_per_gpu / (tflops * 1e12), key
