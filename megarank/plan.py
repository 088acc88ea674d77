"""``megarank plan``: the per-GPU memory and the FLOPs of a training config, before launch.

    megarank plan [--world-size N] [--gpu H100-80GB|80GB] [--headroom 0.1] [--device cuda|cpu]
        [--json OUT.json] [--strict] [hydra overrides, e.g. experiment=qwen3_reranker_8b ...]
    torchrun --nproc_per_node 2 -m megarank.plan --measure [overrides]   # planned vs measured

For every pipeline stage: weights, gradients, optimizer state with the plain and with the
distributed optimizer, activations per micro-batch (groups x documents x pair.max_length) for
each trainer.recompute mode, the micro-batches in flight, and the total per GPU; then the FLOPs
of a step. ``--gpu`` says whether the largest stage fits that card (a name: H100-80GB, H200,
A100-40GB, ...; or a size in GiB) with ``--headroom`` of it left free, and warns, with the
settings that would fit, when it does not (``--strict``: exit 1 then). ``model=hf`` reads only
``model.hf_path/config.json``. ``--measure`` builds this rank's stage here (under torchrun, every
rank's), runs one step on full-length random micro-batches and prints the measured bytes next to
the planned ones (megarank.training.memory). The world size is ``--world-size``, else torchrun's
WORLD_SIZE, else TP x PP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from megarank.api import (
    HEADROOM,
    compose_config,
    env_world_size,
    fit,
    format_plan,
    is_main_process,
    largest_token_budget,
    measure_memory,
    plan_memory,
    suggestions,
)
from megarank.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: options, then Hydra overrides (options may also come after them)."""
    ap = argparse.ArgumentParser(prog="megarank plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=None, help="GPUs (default: WORLD_SIZE, "
                    "else tensor x pipeline parallel size)")
    ap.add_argument("--gpu", default=None, help="card name (H100-80GB, A100-40GB, ...) or "
                    "memory in GiB (80GB) to check the plan against")
    ap.add_argument("--headroom", type=float, default=HEADROOM,
                    help="share of the card left free (CUDA context, NCCL, fragmentation)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="whose kernels the activations follow (default: trainer.device; "
                         "auto plans for CUDA)")
    ap.add_argument("--json", default=None, help="also write the plan (and fit) as JSON here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when it does not fit --gpu")
    ap.add_argument("--measure", action="store_true",
                    help="build the stage here and print measured bytes next to the plan")
    ap.add_argument("overrides", nargs="*", help="hydra overrides")
    ap.add_argument("--require-paths", action="store_true",
                    help="exit 1 when model.hf_path or data.train_path does not exist")
    return ap.parse_intermixed_args(argv)  # options may come after the overrides


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank plan`` / ``python -m megarank.plan``)."""
    args = parse_args(argv)
    cfg = compose_config(args.overrides)
    main_rank = is_main_process()
    missing = describe_paths(cfg, main_rank)
    world = args.world_size or env_world_size(default=0) or (
        cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
    device = args.device
    if args.measure and device is None:  # plan for the kernels the measured stage runs
        import torch

        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = auto if cfg.trainer.device == "auto" else cfg.trainer.device
    try:
        plan = plan_memory(cfg, world, device)
        result = fit(plan, args.gpu, args.headroom) if args.gpu else None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"megarank plan: {e}") from None
    if args.measure:
        comparison, measured = measure_memory(cfg, plan)
        if not main_rank:
            return
    if main_rank:
        print(format_plan(plan, args.gpu, args.headroom), flush=True)
        if args.gpu:
            budget = largest_token_budget(cfg, world, args.gpu, args.headroom, device)
            print(f"largest micro-batch by tokens that fits {args.gpu}: " + (
                f"data.tokens_per_micro_batch={budget} ({budget / cfg.pair.max_length:.1f} "
                f"sequences of pair.max_length={cfg.pair.max_length})" if budget else
                "none (not even one group at pair.max_length)"), flush=True)
        if args.measure:
            print("\nmeasured on this machine (one training step):\n"
                  + comparison, flush=True)
    if args.json and main_rank:
        write_json(args.json, plan, result, measured if args.measure else None)
    if result is not None and not result.fits:
        tips = suggestions(plan, args.gpu, args.headroom)
        print(f"WARNING: megarank plan: stage {plan.largest.stage} needs "
              f"{result.needed / 2**30:.1f} GiB per GPU, more than the {result.usable / 2**30:.1f}"
              f" GiB usable on {result.gpu}"
              + (f"; it would fit with {tips[0]}" if tips else ""), file=sys.stderr, flush=True)
        if args.strict:
            raise SystemExit(1)
    if args.require_paths and missing:
        raise SystemExit(f"megarank plan: {' and '.join(missing)} not found")


def write_json(path: str, plan: Any, result: Any, measured: Any) -> None:
    """The plan, its fit to the card (if one was named) and what was measured, as JSON."""
    record = {"plan": dataclasses.asdict(plan),
              "total_per_gpu": plan.total(), "largest_stage": plan.largest.stage}
    if result is not None:
        record["fit"] = {**dataclasses.asdict(result), "fits": result.fits,
                         "spare": result.spare}
    if measured is not None:
        record["measured"] = measured
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def describe_paths(cfg, show: bool) -> list[str]:
    """Print where the weights and the training data come from, each marked when it does not
    exist; return the settings that name a missing path."""
    from omegaconf import OmegaConf

    missing, lines = [], []
    for key, what in (("model.hf_path", "weights"), ("model.init_from", "weights"),
                      ("data.train_path", "train data")):
        group, name = key.split(".")
        if OmegaConf.is_missing(cfg[group], name):
            lines.append(f"{what}: {key} is not set (???)")
            missing.append(key)
            continue
        value = cfg[group][name]
        if value is None:
            continue
        ok = os.path.exists(str(value))
        lines.append(f"{what}: {key}={value}" + ("" if ok else "  (DOES NOT EXIST)"))
        if not ok:
            missing.append(key)
    if not any(line.startswith("weights") for line in lines):
        if OmegaConf.missing_keys(cfg.model):  # model=hf without its directory
            lines.insert(0, "weights: model.hf_path is not set")
            missing.insert(0, "model.hf_path")
        else:
            lines.insert(0, "weights: none (a fresh initialisation)")
    if show:
        print("\n".join(lines), flush=True)
    return missing


if __name__ == "__main__":
    main()
