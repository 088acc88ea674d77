# shellcheck shell=bash
# Environment for megarank jobs on Slurm GPU clusters, kept in one place and sourced by the sbatch
# scripts under slurm/. Every value is a default: a site or a user overrides it by exporting the
# variable before `sbatch` (sbatch passes the submitting environment through).

: "${GPUS_PER_NODE:?set GPUS_PER_NODE (ranks per node) before sourcing launch/slurm_common.sh}"

# megatron-core's tensor-parallel layers start the sequence-parallel all-gather / reduce-scatter
# before the GEMM they overlap with and rely on one hardware queue to keep that order
# (tensor_parallel/layers.py: "Use of this module requires ... CUDA_DEVICE_MAX_CONNECTIONS=1").
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# InfiniBand retry timeout = 4.096 us x 2^N (NCCL env docs). Recent NCCL defaults to 20 (~4 s);
# 22 (~17 s) rides out a switch or link flap instead of failing the collective and the job.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}

# On a NCCL error or a collective timeout, the watchdog aborts the communicators and kills the
# process, so torchrun and srun exit and the job ends instead of hanging until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# WARN prints NCCL's own reason when a collective fails; INFO is for debugging topology only.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# GPUS_PER_NODE ranks share a node: an OpenMP pool per rank over all cores oversubscribes them 8x,
# and unset, torchrun forces 1 thread per rank (with a warning). Each rank gets its share instead.
_megarank_omp=$(( ${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( _megarank_omp > 0 ? _megarank_omp : 1 ))}
unset _megarank_omp

# HF tokenizers' Rust thread pool would take every core in each of the 8 ranks, competing with
# OMP; after a fork it also disables itself with a warning per process.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# Each rank's lines reach the Slurm log as they are printed, not in 8 KiB blocks lost on a crash.
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
