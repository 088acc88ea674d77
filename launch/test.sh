#!/usr/bin/env bash
# Set up on a fresh machine, then run the whole test suite (CPU, gloo; ~20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
python -m pytest -q tests "$@"
