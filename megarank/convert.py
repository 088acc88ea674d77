"""Convert between Hugging Face models and megarank checkpoints.

    megarank convert from-hf --hf DIR --out CKPT [hydra overrides, e.g. parallel=tp2_pp2 task.head=yes_no]
    megarank convert to-hf --ckpt CKPT_OR_RUN_DIR --out DIR [--as-classifier]

from-hf reads each rank's shard of the weights straight from the HF files (run it under torchrun
to import into a TP/PP layout; megarank checkpoints load into any layout either way). to-hf runs in
one process: the checkpoint is resharded into a single-process model, then written as HF files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from omegaconf import OmegaConf


def from_hf(hf_dir: str, out: str, overrides: list[str]) -> Path:
    """Import an HF model directory as a megarank checkpoint (collective under torchrun)."""
    from megarank.checkpoint.contract import make_contract
    from megarank.checkpoint.dist import save_model_checkpoint
    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config import compose, validate
    from megarank.parallel.runtime import init_runtime, shutdown
    from megarank.training.setup import build_model, build_tokenizer

    cfg = compose(["model=hf", f"model.hf_path={Path(hf_dir).resolve()}", *overrides])
    apply_hf_config(cfg)
    derived = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rt = init_runtime(derived.tp, derived.pp, cfg.trainer.seed, "cpu")
    try:
        tokenizer = build_tokenizer(cfg)
        model, _ = build_model(cfg, rt, tokenizer)
        out_path = Path(out).resolve()
        contract = out_path.parent / f".{out_path.name}.scoring.json"
        if rt.is_main:
            contract.write_text(make_contract(cfg, tokenizer).to_json())
        save_model_checkpoint(
            out_path, model, rt,
            meta={"config": OmegaConf.to_container(cfg, resolve=True), "source": str(hf_dir),
                  "layout": derived.__dict__},
            extra_files=[contract],
        )
        if rt.is_main:
            (out_path / contract.name).rename(out_path / "scoring.json")
            contract.unlink(missing_ok=True)
        return out_path
    finally:
        shutdown()


def to_hf(ckpt: str, out: str, as_classifier: bool = False, max_shard_mb: int = 5120) -> Path:
    """Export a megarank checkpoint (any layout) as an HF model directory (one process)."""
    from megarank.checkpoint.contract import read_contract
    from megarank.checkpoint.dist import load_model_weights, read_meta, resolve_checkpoint
    from megarank.checkpoint.export import export_hf
    from megarank.config import from_saved, register
    from megarank.parallel.runtime import init_runtime, shutdown
    from megarank.training.setup import answer_token_ids, build_model, build_tokenizer

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("megarank convert to-hf runs in one process (not under torchrun)")
    register()
    path = resolve_checkpoint(ckpt)
    cfg = from_saved(read_meta(path)["config"], ["parallel=tp1_pp1", "trainer.precision=fp32"])
    rt = init_runtime(1, 1, cfg.trainer.seed, "cpu")
    try:
        tokenizer = build_tokenizer(cfg)
        model, _ = build_model(cfg, rt, tokenizer, load_weights=False)
        load_model_weights(path, model)
        ids = answer_token_ids(tokenizer, cfg.task) if cfg.task.head == "yes_no" else None
        contract = read_contract(path) if (path / "scoring.json").is_file() else None
        return export_hf(model.module, cfg, out, tokenizer, contract,
                         as_classifier=as_classifier, answer_ids=ids,
                         max_shard_bytes=max_shard_mb * 1024**2)
    finally:
        shutdown()


def main() -> None:
    """CLI entry (``megarank convert`` / ``python -m megarank.convert``)."""
    parser = argparse.ArgumentParser(prog="megarank convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("from-hf", help="HF model directory -> megarank checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (parallel=..., task.head=...)")
    q = sub.add_parser("to-hf", help="megarank checkpoint -> HF model directory")
    q.add_argument("--ckpt", required=True, help="checkpoint directory or run directory")
    q.add_argument("--out", required=True, help="HF model directory to write")
    q.add_argument("--max-shard-mb", type=int, default=5120,
                   help="split model.safetensors into shards of at most this size, with an index")
    q.add_argument("--as-classifier", action="store_true",
                   help="yes/no head: export *ForSequenceClassification, score = w_yes - w_no")
    args = parser.parse_args()
    if args.cmd == "from-hf":
        path = from_hf(args.hf, args.out, args.overrides)
    else:
        path = to_hf(args.ckpt, args.out, args.as_classifier, args.max_shard_mb)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
