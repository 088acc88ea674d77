#!/usr/bin/env bash
# The 7B decoder reranker (megarank/conf/experiment/qwen2_7b_tp4_pp2.yaml) on 2 nodes x 8 GPUs:
# TP4 x PP2 x DP2 = 16 ranks. One Slurm task per node runs torchrun, which starts 8 ranks there.
#
#   mkdir -p logs && sbatch slurm/train_7b.sh [hydra overrides, e.g. trainer.max_steps=2000]
#   MEGARANK_DRY_RUN=1 bash slurm/train_7b.sh [overrides]   # print the srun line, run nothing
#
# Submit from the repository root: Slurm runs a copy of this script from its spool directory, so
# the repository is found through SLURM_SUBMIT_DIR. Slurm does not create logs/ for --output.
#
# Output and checkpoints go to runs/<job name>-<job id>. A requeued job keeps its id, so it finds
# the same directory and trainer.resume=true continues from checkpoints/latest (megarank starts
# fresh, and logs that, when there is none yet).
#
# Graceful stop: 300 s before the time limit Slurm sends USR1 to this batch shell only
# (--signal=B:USR1@300). The trap stops the srun step and requeues the job. megarank has no signal
# handler of its own yet, so the ranks do not save on the way out: they save every
# trainer.save_interval steps (200 in the experiment), and a requeued run resumes from the latest
# COMPLETE checkpoint. A save cut off mid-way stays step_N.partial and is never taken for a good
# one, so at most save_interval steps are redone.
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

CMD=(
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
  --cpus-per-task="${SLURM_CPUS_PER_TASK:-64}"
  python -m torch.distributed.run
  --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE"
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
  -m megarank.train
  experiment=qwen2_7b_tp4_pp2 trainer.output_dir="$OUTPUT_DIR" trainer.resume=true
  "$@"
)

if [ "$RESTARTS" -gt 0 ]; then
  echo "requeued job $SLURM_JOB_ID (restart $RESTARTS): resuming in $OUTPUT_DIR"
else
  echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: output in $OUTPUT_DIR"
fi

if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${CMD[@]}"
  echo
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
