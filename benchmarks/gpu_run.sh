#!/usr/bin/env bash
# The GPU benchmark as one command, for a one-GPU machine with PyTorch and transformers but
# without megatron-core or Hydra: installs the carried wheels (WHEELS, default .gpu/wheels: the
# wheels of shared/gpu/wheels) once per machine into GPU_SITE, compiles their bytecode on every
# core, checks that packed rows score as padded ones on the GPU, then times the peers' table
# (benchmarks/peers.py: the HF loop, megarank padded and packed in one micro-batch, the padding-
# free reference; each system in its own process) on the Qwen2.5-0.5B and BERT-base geometries.
# PHASE=2 runs what comes next on the same machine: the realistic length mix, a token-budget run
# and megarank's padded decoder step by benchmarks/gpu_decoder.py with both scoring heads. Each
# phase fits one 600-s command (tests/scripts/test_gpu_run.py adds up its timeouts); each step has
# its own timeout; the tables and logs go to OUT (default runs/gpu-<date>), summary.md first.
#
#     WHEELS=.gpu/wheels OUT=/tmp/out bash benchmarks/gpu_run.sh
#     WHEELS=.gpu/wheels OUT=/tmp/out PHASE=2 bash benchmarks/gpu_run.sh
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
WHEELS=${WHEELS:-.gpu/wheels}
OUT=${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
PHASE=${PHASE:-1}
mkdir -p "$OUT"
# One site per machine (default /tmp/megarank-gpu-site): a second phase on the same machine
# skips the install and the bytecode.
SITE=${GPU_SITE:-/tmp/megarank-gpu-site}
if [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
      >/dev/null 2>&1 && touch "$SITE/.installed"
fi
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
LOG=$OUT/summary.md
{
  echo "# $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)" \
       "(phase $PHASE)"
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
                                              transformers.__version__)'
} >> "$LOG"
step() {  # name timeout command...
  local name=$1 t=$2
  shift 2
  echo "## $name (at $(( $(date +%s) - T0 )) s)" >> "$LOG"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E '^\||^device|^qwen|^bert|^#|Error' "$OUT/$name.log" | tail -40 >> "$LOG"
  echo "exit $rc" >> "$LOG"
}
B=benchmarks
# A peers step's timeout covers each of its system processes' --child-timeout, so a slow
# system costs its own row (reported as failed), never the table.
if [ "$PHASE" = 1 ]; then
  # Bytecode for megatron-core and the rest on every core (the first process would otherwise
  # compile it alone: about 80 s on a fresh machine).
  step bytecode 40 python3 -m compileall -q -j 0 "$SITE" megarank
  step parity 60 python3 $B/packing_parity.py --models gpt_tiny,bert_tiny
  step decoder 230 python3 $B/peers.py --geometry decoder --warmup 20 --steps 10 \
      --systems hf-bf16,megarank,megarank-packed-1mb,packed-ref-1mb --child-timeout 55
  step encoder 190 python3 $B/peers.py --geometry encoder --warmup 20 --steps 10 \
      --systems hf-bf16,megarank,megarank-packed-1mb,packed-ref-1mb --child-timeout 45
else
  step realistic 230 python3 $B/peers.py --geometry both --lengths realistic --warmup 20 \
      --steps 10 --systems hf-bf16,megarank-packed-1mb --child-timeout 55
  step budget 90 python3 $B/gpu_decoder.py --heads classifier --warmup 12 --steps 10 \
      --packing --token-budget 16384
  step heads 90 python3 $B/gpu_decoder.py --heads classifier,yes_no --warmup 12 --steps 10
fi
echo "total $(( $(date +%s) - T0 )) s" >> "$LOG"
