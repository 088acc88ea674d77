#!/usr/bin/env bash
# The GPU benchmark as one command, for a one-GPU machine with PyTorch and transformers but
# without megatron-core or Hydra: installs the carried wheels (WHEELS, default .gpu/wheels: the
# wheels of shared/gpu/wheels), checks that packed rows score as padded ones on the GPU, then
# times megarank padded and packed (Qwen2.5-0.5B and BERT-base geometry) and the peers (the HF
# loop and the padding-free reference). Each step has its own timeout; the tables and logs go
# to OUT (default runs/gpu-<date>), summary.md first.
#
#     WHEELS=.gpu/wheels OUT=/tmp/out bash benchmarks/gpu_run.sh
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
WHEELS=${WHEELS:-.gpu/wheels}
OUT=${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    >/dev/null 2>&1
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
LOG=$OUT/summary.md
{
  echo "# $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
                                              transformers.__version__)'
} > "$LOG"
step() {  # name timeout command...
  local name=$1 t=$2
  shift 2
  echo "## $name (at $(( $(date +%s) - T0 )) s)" >> "$LOG"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E '^\||^device|^qwen|^bert|^#|Error' "$OUT/$name.log" | tail -30 >> "$LOG"
  echo "exit $rc" >> "$LOG"
}
B=benchmarks
# The first megarank process compiles megatron-core's bytecode (about 80 s on a fresh machine).
step parity 120 python3 $B/packing_parity.py --models gpt_tiny,bert_tiny
step decoder 180 bash -c "python3 $B/gpu_decoder.py --heads classifier --warmup 12 --steps 10 &&
  python3 $B/gpu_decoder.py --heads classifier --warmup 12 --steps 10 --packing &&
  python3 $B/gpu_decoder.py --heads classifier --warmup 12 --steps 10 --packing \
    --micro-groups 8 --micro-batches 1 &&
  python3 $B/gpu_decoder.py --heads classifier --warmup 12 --steps 10 --packing \
    --token-budget 16384"
step encoder 110 bash -c "python3 $B/gpu_decoder.py --model bert_base --heads classifier \
    --warmup 12 --steps 10 && python3 $B/gpu_decoder.py --model bert_base --heads classifier \
    --warmup 12 --steps 10 --packing --micro-groups 8 --micro-batches 1"
step peers 130 python3 $B/peers.py --geometry both --systems hf-bf16,packed-ref-1mb \
    --warmup 10 --steps 10 --child-timeout 60
echo "total $(( $(date +%s) - T0 )) s" >> "$LOG"
