#!/usr/bin/env bash
# The main job on a fresh CPU machine: install; import all-MiniLM-L6-v2; train it as a reranker on
# Cranfield + CISI train triplets and pseudo-queries with two gloo processes (torchrun); export to
# Hugging Face; rerank BM25's top 50 on the Cranfield and CISI test splits; print BM25 vs
# megarank vs the teacher.
# Everything lands in one run directory (default runs/quickstart-<date>).
# Options: see `python -m megarank.quickstart --help` (e.g. --steps, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
python -m megarank.quickstart "$@"
