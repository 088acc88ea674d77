#!/usr/bin/env bash
# Set up on a fresh machine (skipped when nothing changed), then run the test suite (CPU, gloo):
# everything, ~26 minutes on 2 cores; `bash launch/test.sh -m "not slow"` ~7 minutes;
# `bash launch/test.sh tests/unit` is the fast tier (in process only, ~1 minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# No path given: pytest takes testpaths (tests/) from pyproject.toml; a path narrows the run.
python -m pytest -q "$@"
