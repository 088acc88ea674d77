#!/usr/bin/env bash
# The main job on a fresh CPU machine: install, train a small cross-encoder on Cranfield with two
# gloo processes (data parallel), evaluate on the held-out test queries by reranking BM25's top 30,
# and print BM25 vs megarank. Outputs (config, checkpoints, metrics.jsonl, report.json) go to one
# run directory. About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
OUT=${1:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
python -m torch.distributed.run --standalone --nproc_per_node 2 -m megarank.train \
  model=gpt_tiny parallel=tp1_pp1 task=listwise data=cranfield \
  trainer.max_steps=200 trainer.log_interval=20 trainer.eval_interval=100 \
  trainer.eval_at_start=true optim.lr=1e-3 optim.warmup_steps=20 \
  trainer.output_dir="$OUT"
python -m megarank.eval.report "$OUT"
echo "run directory: $OUT"
