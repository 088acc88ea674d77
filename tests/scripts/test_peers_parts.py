"""benchmarks/peers.py's pieces that need no run: the speed targets it reads off a table, and
what it pins before copying a step to the GPU. Seconds, so outside the slow tier, where the
benchmark's smoke run is (tests/scripts/test_peers_benchmark.py)."""

from __future__ import annotations

from tests.helpers.runs import load_benchmark


def test_the_speed_targets_read_off_a_table(monkeypatch):
    """Each target compares the right rows and says no when a figure misses: a GPU table
    (megarank packed in one micro-batch against the HF loop and the padding-free reference,
    MFU, GPU busy, cold start) and a CPU one (the proxies)."""
    import argparse

    peers = load_benchmark("peers", monkeypatch)
    args = argparse.Namespace(lengths="uniform", warmup=20, steps=100)
    gpu = [{"system": "hf-bf16", "status": "ok", "pairs_per_s": 100.0, "gpu_busy": 0.7},
           {"system": "packed-ref-1mb", "status": "ok", "pairs_per_s": 290.0, "gpu_busy": 0.9,
            "peak_gib": 40.0},
           {"system": "megarank", "status": "ok", "pairs_per_s": 150.0, "gpu_busy": 0.8},
           {"system": "megarank-packed-1mb", "status": "ok", "pairs_per_s": 300.0,
            "gpu_busy": 0.93, "mfu": 0.38, "cold_s": 0.25, "step_s": 0.2,
            "peak_gib": 42.5, "main_weights_gib": 1.8}]
    met = {what: (system, ok) for what, system, _, _, ok in peers.targets(args, "decoder", gpu)}
    assert met == {"pairs/s against hf-bf16": ("megarank-packed-1mb", True),
                   "pairs/s against the padding-free reference": ("megarank-packed-1mb", True),
                   "peak memory: the reference's + fp32 main weights": (
                       "megarank-packed-1mb", False),  # 42.5 > 40 + 1.8
                   "MFU at real tokens": ("megarank-packed-1mb", False),
                   "GPU busy": ("megarank-packed-1mb", True),
                   "first 20 steps from cold / steady": ("megarank-packed-1mb", True)}
    gpu[-1]["peak_gib"] = 41.5
    encoder = {what: ok for what, _, _, _, ok in peers.targets(args, "encoder", gpu)}
    assert encoder == {"pairs/s against hf-bf16": True,  # 3.0x >= 2x
                       "pairs/s against the padding-free reference": True,
                       "peak memory: the reference's + fp32 main weights": True}
    args.lengths = "realistic"  # 3x needed
    assert [ok for what, _, _, _, ok in peers.targets(args, "decoder", gpu)
            if what == "pairs/s against hf-bf16"] == [True]
    gpu[-1]["pairs_per_s"] = 250.0
    assert [ok for what, _, _, _, ok in peers.targets(args, "decoder", gpu)] == [
        False, False, True]

    args.lengths = "uniform"
    cpu = [{"system": "hf-bf16", "status": "ok", "ops_per_micro_batch": 1122.0},
           {"system": "megarank", "status": "ok", "ops_per_micro_batch": 904.0, "syncs": 2,
            "shapes": 5, "real_tokens": 55.0, "padded_tokens": 100.0, "gpu_busy": None},
           {"system": "megarank-packed-1mb", "status": "ok", "syncs": 2, "shapes": 6,
            "real_tokens": 98.2, "padded_tokens": 100.0, "gpu_busy": None}]
    met = {what: ok for what, _, _, _, ok in peers.targets(args, "encoder", cpu)}
    assert met == {"host syncs a step": True, "distinct shapes over the steps": True,
                   "padding, packed": True, "operators a micro-batch against hf-bf16": True}
    cpu[2].update(syncs=3, shapes=9, real_tokens=90.0)
    cpu[1]["ops_per_micro_batch"] = 1200.0
    assert not any(ok for *_, ok in peers.targets(args, "encoder", cpu))
    cpu[2]["status"] = "failed"  # the padded row answers what it can
    assert [what for what, *_ in peers.targets(args, "encoder", cpu)] == [
        "host syncs a step", "distinct shapes over the steps",
        "operators a micro-batch against hf-bf16"]


def test_pinning_reaches_a_packed_batchs_boundaries(monkeypatch):
    """On CUDA the benchmark pins each micro-batch so its copy to the GPU does not wait: a
    packed batch's boundaries and positions (a batch nested in the batch) are pinned too."""
    import torch

    from megarank.data.batch import PairBatch
    from megarank.data.packing import pack_batch

    peers = load_benchmark("peers", monkeypatch)
    pinned = []

    def pin(t):  # pin_memory needs an accelerator: record what would be pinned
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    ids = torch.tensor([[5, 6, 7, 0], [5, 8, 0, 0]])
    batch = pack_batch(PairBatch(ids, (ids > 0).long(), torch.zeros_like(ids),
                                 torch.tensor([2, 1]), 2, 5), 8)
    out = peers._pin(batch)
    leaves = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    nested = [v for v in vars(batch.packed).values() if isinstance(v, torch.Tensor)]
    assert nested and len(pinned) == len(leaves) + len(nested)
    assert torch.equal(out.packed.cu_seqlens, batch.packed.cu_seqlens)
    assert out.packed.cu_seqlens is not batch.packed.cu_seqlens
