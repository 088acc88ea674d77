"""The plan of a layout: each pipeline stage's model state and activations
(:func:`plan_memory`), and the largest token budget that fits a card."""

from __future__ import annotations

import math
from typing import Any

from megarank.config.validate import validate
from megarank.training.flops import forward_flops_breakdown, step_flops
from megarank.training.sizing.activations import (
    head_bytes,
    kept_bytes,
    layer_terms,
    pooled_in_plan,
    pooled_layer_terms,
    stage_terms,
)
from megarank.training.sizing.fit import fit
from megarank.training.sizing.params import (
    adapter_params,
    dora_saved_per_token,
    head_params,
    linear_weights,
    stage_params,
    total_params,
)
from megarank.training.sizing.records import (
    DEVICES,
    FP32,
    HEADROOM,
    RECOMPUTE,
    WIDTH,
    MemoryPlan,
    StagePlan,
)


def resolve_device(cfg: Any, device: str | None) -> str:
    """The device the plan is for: ``device``, else trainer.device (``auto`` plans for CUDA)."""
    dev = device or cfg.trainer.device
    dev = "cuda" if dev == "auto" else dev
    if dev not in DEVICES:
        raise ValueError(f"device ({dev!r}) must be one of {', '.join(DEVICES)}")
    return dev


def hf_resolved(cfg: Any) -> Any:
    """``cfg`` with the model group filled from model.hf_path's config.json (a copy; unchanged
    when no HF path is set). A missing directory is named, with what the plan needs from it."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from megarank.checkpoint.hf import apply_hf_config

    if OmegaConf.is_missing(cfg.model, "hf_path") or not cfg.model.hf_path:
        unset = sorted(OmegaConf.missing_keys(cfg.model))
        if unset or OmegaConf.is_missing(cfg.model, "hf_path"):
            raise ValueError(
                "model.hf_path is not set: give model.hf_path=DIR, the Hugging Face directory "
                "whose config.json sizes the model" + (f" ({', '.join(unset)} unset)"
                                                       if unset else ""))
        return cfg

    path = Path(str(cfg.model.hf_path))
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(
            f"model.hf_path={path} {what}: the plan reads the model's geometry (layers, "
            "hidden size, heads, vocabulary) from its config.json")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    apply_hf_config(cfg)
    return cfg


def plan_memory(cfg: Any, world_size: int, device: str | None = None) -> MemoryPlan:
    """Memory per GPU and FLOPs per step of ``cfg`` (a composed config) on ``world_size`` GPUs.

    Validates the config for that world first (a layout that does not divide is refused, the
    fields named). ``device``: whose kernels the activation terms follow (default: the config's
    trainer.device, ``auto`` meaning CUDA). Reads no weights; ``model=hf`` reads config.json.
    """
    cfg = hf_resolved(cfg)
    d = validate(cfg, world_size)
    dev = resolve_device(cfg, device)
    m, trainer = cfg.model, cfg.trainer
    length = int(cfg.pair.max_length)
    windows = int(cfg.data.train_passages) if cfg.data.passages == "max" else 1
    budget = cfg.data.tokens_per_micro_batch
    sequences = budget / length if budget else d.pairs_per_micro_batch * windows
    terms = layer_terms(cfg, d.tp, dev, length)
    per_layer = {mode: kept_bytes(terms, mode, sequences, length) for mode in RECOMPUTE}
    core = per_layer["none"] - per_layer["selective"]
    after = kept_bytes([x for x in terms if x.after_core], "none", sequences, length)
    # Full recompute re-runs one layer in the backward, which materialises again what
    # "none" keeps for it. Selective recompute re-runs the core attention once the layer's
    # projection and MLP backward have freed their tensors: it adds what the core keeps
    # beyond those (nothing with flash attention). Both are upper bounds: the final norm's
    # and the head's tensors are freed by then too.
    working = {"none": 0, "selective": int(max(0.0, core - after)),
               "full": int(per_layer["none"] - per_layer["full"])}
    stages = [_stage_plan(cfg, d, r, dev, per_layer, working, sequences) for r in range(d.pp)]
    seqs_per_step = int(trainer.global_batch_size) * int(cfg.task.group_size) * windows
    flops = step_flops(m, length, seqs_per_step, head=cfg.pair.head)
    fwd = forward_flops_breakdown(m, length, head=cfg.pair.head)
    recompute_flops = {"none": 0.0, "selective": fwd["attention"] * seqs_per_step,
                       "full": sum(fwd.values()) * seqs_per_step}
    return MemoryPlan(
        name=str(m.name), world_size=world_size, tp=d.tp, pp=d.pp, dp=d.dp,
        precision=str(trainer.precision), device=dev, recompute=str(trainer.recompute),
        distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        sequence_parallel=bool(cfg.parallel.sequence_parallel),
        groups=int(trainer.micro_batch_size), documents=int(cfg.task.group_size), length=length,
        num_microbatches=d.num_microbatches, global_batch=int(trainer.global_batch_size),
        total_params=total_params(cfg), stages=stages, layer_terms=terms, step_flops=flops,
        recompute_flops=recompute_flops, windows=windows,
        token_budget=int(budget) if budget else None,
    )


def _stage_plan(cfg: Any, d: Any, r: int, dev: str, per_layer: dict[str, float],
                working: dict[str, int], sequences: float) -> StagePlan:
    """Pipeline stage ``r`` of the layout ``d``: its model state and its activations (one
    layer's ``per_layer`` bytes per recompute mode, for ``sequences`` per micro-batch)."""
    m, trainer = cfg.model, cfg.trainer
    width = WIDTH[trainer.precision]
    length = int(cfg.pair.max_length)
    layers = int(m.num_layers) // d.pp
    h = int(m.hidden_size)
    hs = h / d.tp if cfg.parallel.sequence_parallel else h
    extra = stage_terms(cfg, d.tp, d.pp, r, dev)
    dora = dora_saved_per_token(cfg, d.tp, width) * sequences * length
    saved = {}
    for mode in RECOMPUTE:
        n = layers * per_layer[mode] + kept_bytes(extra, mode, sequences, length)
        if mode != "full":  # full recompute keeps the layer's input only
            n += layers * dora
        if r == d.pp - 1:
            n += head_bytes(cfg, sequences, dev)
            if pooled_in_plan(cfg, dev) and layers:  # the last layer: the pooled rows only
                pooled = pooled_layer_terms(cfg, d.tp, dev, length)
                n += kept_bytes(pooled, mode, sequences, length) - per_layer[mode]
        saved[mode] = int(n)
    in_flight = min(d.num_microbatches, d.pp - r)
    outputs = 0 if r == d.pp - 1 else int(in_flight * sequences * length * hs * width)
    params = stage_params(cfg, d.tp, d.pp, r)
    weights, trained = params * width, params
    if cfg.peft.method != "none":
        # LoRA/DoRA: the base is frozen; adapters (and the classifier head) train.
        adapters = layers * adapter_params(cfg, d.tp)
        trained = adapters + (head_params(cfg) if r == d.pp - 1 and cfg.peft.train_head
                              else 0)
        params += adapters
        weights = params * width
        if cfg.peft.method == "qlora":  # NF4: two weights a byte, in place of `width`
            base = layers * linear_weights(m, d.tp)
            weights -= base * width - base // 2
    optim = trained * (8 if trainer.precision == "fp32" else 12)
    return StagePlan(
        stage=r, layers=layers, params=params, weights=weights, grads=trained * FP32,
        optim_plain=optim, optim_distributed=int(math.ceil(optim / d.dp)),
        saved_per_micro_batch=saved, working_set=dict(working), in_flight=in_flight,
        pipeline_outputs=outputs,
    )


def largest_token_budget(cfg: Any, world_size: int, gpu: str, headroom: float = HEADROOM,
                         device: str | None = None) -> int | None:
    """The largest ``data.tokens_per_micro_batch`` whose plan fits ``gpu`` (in steps of
    data.packed_multiple with packing, else of pair.max_length), or None when not even one
    group at its longest fits. The config's other choices (recompute, optimizer) stay."""
    from omegaconf import OmegaConf

    d = cfg.data
    step = int(d.packed_multiple if d.packing else cfg.pair.max_length)
    windows = int(d.train_passages) if d.passages == "max" else 1
    least = -(-int(cfg.task.group_size) * windows * int(cfg.pair.max_length) // step)

    def fits(k: int) -> bool:
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        c.data.tokens_per_micro_batch = k * step
        return fit(plan_memory(c, world_size, device), gpu, headroom).fits

    if not fits(least):
        return None
    lo, hi = least, least * 2
    while fits(hi):  # double until it no longer fits, then halve the gap
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step
