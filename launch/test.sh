#!/usr/bin/env bash
# Set up on a fresh machine (skipped when nothing changed), then run the test suite (CPU, gloo):
# everything, 15-42 minutes on 2 cores (by CPU); `bash launch/test.sh -m "not slow"` ~5 minutes;
# `bash launch/test.sh tests/unit` is the fast tier (in process only, about a minute and a half).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# Two pytest workers share the cores, and a one-process command or an in-process embedding runs
# torch on 2 threads: OpenMP's idle threads spin (300,000 turns by default) waiting for work,
# on cores the other worker needs. 1,000 turns: side by side 1.85x as fast, alone 5% slower
# (benchmarks/omp_spin.py; the numbers are in benchmarks/RESULTS.md).
export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-1000}
# No path given: pytest takes testpaths (tests/) from pyproject.toml; a path narrows the run.
# Files are dealt to MEGARANK_TEST_WORKERS pytest workers (pytest-xdist; default 2, one per core
# of the CI machine; 0 runs in this process): a file's tests stay on one worker, so its module
# fixtures are built once. Most tests keep one core busy, so two workers nearly halve the time.
# --durations: the 25 slowest tests close the output, so a suite that grows (or a machine that
# is slower at something, like bf16 on an AVX2 CPU) shows where its minutes went.
python -m pytest -q -n "${MEGARANK_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
