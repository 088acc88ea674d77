#!/usr/bin/env bash
# One node: torchrun with one process per visible GPU (or NPROC, or 2 CPU processes without GPUs).
# Usage: bash launch/train.sh model=gpt_tiny parallel=tp2_pp1 task=listwise data=cranfield
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m megarank.train "$@"
