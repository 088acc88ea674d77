#!/usr/bin/env bash
# The 7B/8B rerankers on 2 nodes x 8 GPUs: TP4 x PP2 x DP2 = 16 ranks. One Slurm task per node
# runs torchrun, which starts 8 ranks there. Without experiment=..., it trains the default
# (megarank/conf/experiment/qwen2_7b_tp4_pp2.yaml: Qwen2.5-7B geometry from a fresh start);
# the presets that start from real weights take them, and the tokenizer, from a directory:
#
#   mkdir -p logs && sbatch slurm/train_7b.sh experiment=qwen3_reranker_8b \
#       model.hf_path=/models/Qwen3-Reranker-8B data.train_path=/data/triplets.jsonl
#   (also experiment=qwen2p5_7b_classifier or llama3_8b_classifier; extra overrides last)
#   MEGARANK_DRY_RUN=1 bash slurm/train_7b.sh [same arguments]   # print, run nothing
#
# Before the step starts (and in a dry run) `megarank plan` prints the weights and data paths and
# the per-GPU memory of the layout, and says how much of a MEGARANK_GPU (default H100-80GB) it
# leaves. A weights path without config.json, or a layout that does not divide, stops the job
# there; a layout that does not fit is reported and the job runs anyway (MEGARANK_PLAN_STRICT=1:
# it stops too). A dry run prints the srun line and that plan and exits with the plan's status.
#
# Submit from the repository root: Slurm runs a copy of this script from its spool directory, so
# the repository is found through SLURM_SUBMIT_DIR. Slurm does not create logs/ for --output.
#
# Output and checkpoints go to runs/<job name>-<job id>. A requeued job keeps its id, so it finds
# the same directory and trainer.resume=true continues from checkpoints/latest (megarank starts
# fresh, and logs that, when there is none yet).
#
# Graceful stop: 300 s before the time limit Slurm sends USR1 to this batch shell only
# (--signal=B:USR1@300). The trap stops the srun step and requeues the job: SIGTERM reaches the
# ranks through srun and torchrun, and megarank saves at the next step boundary and exits
# (megarank/training/loop.py). torchrun kills ranks still running 30 s after its SIGTERM, so a
# save that takes longer is cut off: it stays step_N.partial, is never taken for a good one, and
# the requeued run resumes from the latest COMPLETE checkpoint (every trainer.save_interval
# steps, 200 in the experiments), redoing at most that many steps.
#
# --cpus-per-task and --time are per-site choices: 64 cores feed 8 ranks (launch/slurm_common.sh
# gives each rank cores / 8 OpenMP threads); lower it on smaller nodes.
#SBATCH --job-name=megarank-qwen2-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# --open-mode=append: a requeued run appends to the same log instead of truncating it.
set -euo pipefail

DRY_RUN=${MEGARANK_DRY_RUN:-0}
: "${SLURM_JOB_ID:?submit with sbatch (or set the SLURM_* variables with MEGARANK_DRY_RUN=1)}"
: "${SLURM_JOB_NAME:?submit with sbatch}" "${SLURM_NNODES:?submit with sbatch}"
: "${SLURM_JOB_NODELIST:?submit with sbatch}"

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
REPO=$(pwd -P)

# Must match --gpus-per-node above: 2 nodes x 8 = the 16 ranks that TP4 x PP2 x DP2 needs.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# shellcheck source=launch/slurm_common.sh
source "$REPO/launch/slurm_common.sh"

# Rendezvous on the first node. The port is derived from the job id so two jobs sharing a node do
# not collide, and a requeued job (same id) uses the same one.
# (mapfile, not `| head -n 1`: under pipefail, head closing the pipe early can fail the line.)
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS[0]:?scontrol show hostnames printed no host for $SLURM_JOB_NODELIST}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
# Absolute, so every node's ranks name the same directory (on the shared file system).
OUTPUT_DIR="$REPO/runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"
RESTARTS=${SLURM_RESTART_COUNT:-0}

# The experiment is the last experiment=... argument (else the default); the other overrides
# follow the script's own, in order, so they win.
EXPERIMENT=qwen2_7b_tp4_pp2
OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    experiment=*) EXPERIMENT=${arg#experiment=} ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done
HYDRA=(experiment="$EXPERIMENT" trainer.output_dir="$OUTPUT_DIR" trainer.resume=true
       ${OVERRIDES[@]+"${OVERRIDES[@]}"})

CMD=(
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
  --cpus-per-task="${SLURM_CPUS_PER_TASK:-64}"
  python -m torch.distributed.run
  --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE"
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
  -m megarank.train
  "${HYDRA[@]}"
)
PLAN=(python -m megarank.plan --world-size "$(( SLURM_NNODES * GPUS_PER_NODE ))"
      --gpu "${MEGARANK_GPU:-H100-80GB}" --require-paths "${HYDRA[@]}")
if [ "${MEGARANK_PLAN_STRICT:-0}" = 1 ]; then PLAN+=(--strict); fi

if [ "$RESTARTS" -gt 0 ]; then
  echo "requeued job $SLURM_JOB_ID (restart $RESTARTS): resuming in $OUTPUT_DIR"
else
  echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: output in $OUTPUT_DIR"
fi

if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${CMD[@]}"
  echo
fi

# The plan reads only config.json of the weights; on the batch host, before any GPU is used.
plan_rc=0
"${PLAN[@]}" || plan_rc=$?
if [ "$plan_rc" -ne 0 ]; then
  echo "megarank plan failed (exit $plan_rc): not starting the training step" >&2
  exit "$plan_rc"
fi
if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi

SRUN_PID=""
# USR1 interrupts `wait` below, then this runs: stop the step (srun forwards SIGTERM to torchrun,
# which stops its ranks), wait for it, and put the job back in the queue with the same id.
# shellcheck disable=SC2329  # called through the trap below, which shellcheck does not follow
on_usr1() {
  echo "USR1: time limit in 300 s; stopping the step and requeueing job $SLURM_JOB_ID"
  if [ -n "$SRUN_PID" ]; then
    kill -TERM "$SRUN_PID" 2>/dev/null || true
    wait "$SRUN_PID" || true
  fi
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_usr1 USR1

# In the background: bash runs a trap only between commands, and `wait` is one it interrupts.
"${CMD[@]}" &
SRUN_PID=$!
rc=0
wait "$SRUN_PID" || rc=$?
# A failed run is not requeued: it would most likely fail the same way again.
exit "$rc"
