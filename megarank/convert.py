"""Convert between Hugging Face models and megarank checkpoints.

    megarank convert from-hf --hf DIR --out CKPT [hydra overrides, e.g. parallel=tp2_pp2 pair.head=yes_no]
    megarank convert to-hf --ckpt CKPT_OR_RUN_DIR --out DIR [--as-classifier] [--best] [--adapter]

from-hf reads each rank's shard of the weights straight from the HF files (run it under torchrun
to import into a TP/PP layout; megarank checkpoints load into any layout either way). to-hf
streams: it reads one tensor at a time from the checkpoint (any layout) and writes each
safetensors shard as it fills, without building the model; under torchrun the ranks share the
tensors.
This is ``megarank.convert_from_hf`` / ``megarank.convert_to_hf`` on the command line.
"""

from __future__ import annotations

import argparse

from megarank.api import ArgumentError, convert_from_hf, convert_to_hf, is_main_process


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank convert`` / ``python -m megarank.convert``)."""
    parser = argparse.ArgumentParser(prog="megarank convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("from-hf", help="HF model directory -> megarank checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--adapter", default=None,
                   help="a PEFT LoRA adapter directory for --hf: import a LoRA checkpoint")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (parallel=..., pair.head=...)")
    q = sub.add_parser("to-hf", help="megarank checkpoint -> HF model directory")
    q.add_argument("--ckpt", required=True, help="checkpoint directory or run directory")
    q.add_argument("--out", required=True, help="HF model directory to write")
    q.add_argument("--max-shard-mb", type=int, default=5120,
                   help="split model.safetensors into shards of at most this size, with an index")
    q.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="cast the weights (default: as stored); sets config.json torch_dtype")
    q.add_argument("--best", action="store_true",
                   help="a run directory's best checkpoint (trainer.keep_best), not its latest")
    q.add_argument("--as-classifier", action="store_true",
                   help="yes/no head: export *ForSequenceClassification, score = w_yes - w_no")
    q.add_argument("--adapter", action="store_true",
                   help="LoRA checkpoint: write a PEFT adapter directory (adapter_config.json + "
                        "adapter_model.safetensors) for its base, not the merged model")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "from-hf":
            path = convert_from_hf(args.hf, args.out, args.overrides, adapter=args.adapter)
        else:
            path = convert_to_hf(args.ckpt, args.out, as_classifier=args.as_classifier,
                                 max_shard_mb=args.max_shard_mb, best=args.best,
                                 dtype=args.dtype, adapter=args.adapter)
    except ArgumentError as e:
        raise SystemExit(f"megarank convert {args.cmd}: {e.as_flags()}") from None
    if is_main_process():
        print(f"wrote {path}")


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
