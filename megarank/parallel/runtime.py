"""Process groups, megatron parallel state, seeds and the device: the one place they are set up.

This module is the only caller of ``parallel_state.initialize_model_parallel``. Everything else asks
:class:`Runtime` (or megatron's ``parallel_state`` getters) for ranks and groups.

What megatron needs is keyed on the run's device, not on the host: a run on the CPU (no CUDA,
``trainer.device=cpu`` on a CUDA machine, or a command that asks for the CPU) gets gloo and the
CPU compatibility layer (:mod:`megarank.parallel.cpu_compat`); a run on CUDA gets NCCL and
megatron as it is. The optimizer fixes of :mod:`megarank.parallel.megatron` apply on both.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megarank.parallel import cpu_compat
from megarank.parallel.env import env_local_rank, env_world_size, launched_by_torchrun


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the world and in the TP x PP x DP layout."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        """This rank runs the embeddings (pipeline stage 0)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank runs the scoring head and computes the loss."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that logs and writes run files."""
        return self.rank == 0


def select_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when a device is present, else the CPU; ``cuda`` without one is an error.

    On CUDA each process takes the GPU of its LOCAL_RANK, so a node started with more processes
    than it has GPUs (``torchrun --nproc_per_node 2`` on a one-GPU machine) is stopped here, in
    every rank without a GPU, before a process group or model is built.
    """
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise RuntimeError("trainer.device is 'cuda' but no CUDA device is available")
    if requested == "cpu" or not has_cuda:
        return torch.device("cpu")
    local_rank = env_local_rank()
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        plural = "s" if gpus != 1 else ""
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} has no GPU: this node has {gpus} CUDA device{plural} "
            f"(as CUDA_VISIBLE_DEVICES shows them) and each process takes the GPU of its "
            f"LOCAL_RANK; start one process per GPU, torchrun --nproc_per_node {gpus} "
            f"(python -m megarank.quickstart --nproc {gpus}), or run on the CPU with "
            "trainer.device=cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cpu_half_precision_note(precision: str, device: torch.device) -> str | None:
    """A warning when a half precision runs on a CPU without native support for it, else None.

    oneDNN computes bf16 (fp16) matmuls natively only on CPUs with AVX512-BF16 or AMX (AVX512-FP16
    or AMX-FP16); elsewhere (an AVX2 machine, for one) they are emulated and run tens of times
    slower than fp32, so a run there would train correctly but at a crawl.
    """
    if device.type != "cpu" or precision not in ("bf16", "fp16"):
        return None
    supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if precision == "bf16"
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    if supported:
        return None
    return (f"trainer.precision={precision} on a CPU without native {precision} matmuls "
            f"({torch.backends.cpu.get_cpu_capability()}; oneDNN needs AVX512-BF16/AMX for bf16, "
            f"AVX512-FP16/AMX-FP16 for fp16): they are emulated, tens of times slower than fp32; "
            f"trainer.precision=fp32 is the fast choice on this machine")


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed: NCCL on CUDA, gloo on CPU.

    Under torchrun (or Slurm via torchrun) the environment supplies the rendezvous; a plain
    ``python -m megarank.train`` becomes a world of one on a free local port.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if not launched_by_torchrun():
        # A world of one rendezvouses through a file: no port to race other processes for.
        # The group's end removes it (_destroy_group); torch's store alone left one behind for
        # every group a process brought up and took down.
        global _rendezvous_file
        fd, path = tempfile.mkstemp(prefix="megarank-rdzv-")
        os.close(fd)
        os.unlink(path)
        _rendezvous_file = path
        kwargs.update(init_method=f"file://{path}", rank=0, world_size=1)
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs
    )


_rendezvous_file: str | None = None


def _destroy_group() -> None:
    """Destroy the default process group and remove the rendezvous file it was made with."""
    global _rendezvous_file
    if dist.is_initialized():
        dist.destroy_process_group()
    if _rendezvous_file is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_rendezvous_file)
        _rendezvous_file = None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker.

    megatron's tracker gives TP ranks distinct dropout streams (seed + 2718 + tp_rank); the global
    torch generator is re-seeded last so that it is the same on every rank whatever the tracker did.
    """
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_runtime(tp: int, pp: int, seed: int, device: str = "auto") -> Runtime:
    """Bring up distributed, megatron parallel state and seeds; return this rank's :class:`Runtime`.

    ``device`` is ``auto``, ``cpu`` or ``cuda`` (see :func:`select_device`). On the CPU, megatron's
    CUDA assumptions are handled by :func:`cpu_compat.apply`, whatever the host has; on CUDA an
    earlier CPU run's layer (e.g. in a test process) is reverted.
    """
    dev = select_device(device)
    if dev.type == "cpu":
        cpu_compat.apply()
    else:
        cpu_compat.revert()
    init_distributed(dev)

    from megatron.core import parallel_state as ps

    from megarank.parallel.megatron import apply_optimizer_fixes

    apply_optimizer_fixes()

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    seed_everything(seed)
    return current_runtime(dev)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """glibc's malloc keeps freed memory in the process for reuse (``trainer.keep_freed_memory``):
    blocks up to 1 GiB come from the heap instead of their own ``mmap`` (the default above 128
    KiB, adjusted up to 32 MiB), and the heap's free top is not returned to the system. A CPU
    training step allocates and frees the same few hundred MB of activations and gradients
    every step; with the defaults much of that is mapped afresh each time and every page
    faulted in and zeroed by the kernel again (MiniLM, 16 pairs x 128 tokens: ~40,000 page
    faults and 0.13 s of system time a step on this machine). The process's resident memory
    then stays at its peak. What the allocators Intel recommends for CPU training (jemalloc,
    tcmalloc) do, with the allocator every Linux Python already has. Returns whether it was
    applied (glibc only; elsewhere nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # Older glibc caps the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2): then that.
    mapped = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def current_runtime(device: torch.device) -> Runtime:
    """This process's place in the layout megatron's parallel state holds now."""
    from megatron.core import parallel_state as ps

    return Runtime(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env_local_rank(),
        device=device,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def shutdown() -> None:
    """Tear down megatron parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _destroy_group()


@contextmanager
def cpu_process_group() -> Iterator[bool]:
    """A gloo process group for the block, so the ranks of a torchrun job (``WORLD_SIZE`` > 1)
    share CPU work (export, mining); yields whether it made the group, which it then destroys on
    the way out. Inside a group already up (a training run, a test's) or in a plain process it
    makes nothing and leaves the group alone."""
    owns = env_world_size() > 1 and not dist.is_initialized()
    if owns:
        init_distributed(torch.device("cpu"))
    try:
        yield owns
    finally:
        if owns:
            _destroy_group()
