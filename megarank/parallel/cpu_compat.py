"""Run megatron-core on the CPU: when the run's device is the CPU, on any machine.

megatron-core is written for GPUs and assumes CUDA in five places (observed with 0.16.1 and 0.19.2;
what the rest of megarank needs from a given megatron-core release is in
:mod:`megarank.parallel.megatron`):

1. its model-parallel RNG tracker reads and writes the CUDA generator;
2. buffers are allocated on ``torch.cuda.current_device()`` (global memory buffer, p2p receive
   buffers, DDP grad buffers) and ``torch.cuda.synchronize()`` is called;
3. DDP grad sync may use CUDA streams;
4. optimizers classify parameters by ``Tensor.type()`` strings: ``clip_grad_by_total_norm_fp32``
   asserts ``'torch.cuda.FloatTensor'``; the mixed-precision and distributed optimizers raise on
   CPU type names;
5. tensor factories with a hard-coded ``device="cuda"`` (pipeline schedules, optimizer, clip_grads,
   core.utils).

Rather than a global ``TorchFunctionMode`` (which rewrites every op and made steps ~1.8x slower), each
affected megatron module gets its own view of ``torch`` in which factories put "cuda" tensors on
the CPU and ``torch.cuda`` answers for the CPU: no device, the current device is the CPU, streams
are no-ops and the "device generator" is the CPU generator. Ops outside those modules are untouched,
so this costs nothing on the hot path.

:func:`apply` is called by ``init_runtime`` whenever the run's device is the CPU (no CUDA,
``trainer.device=cpu``, or a command that asks for the CPU), also on a machine with CUDA: the
patched modules then see no CUDA at all, so their buffers and RNG stay on the CPU. While applied,
megatron cannot use CUDA in this process; :func:`revert` restores it (tests use it). Both are
idempotent. Each thing it enables has a test in ``tests/unit/test_cpu_compat.py``, run with and
without CUDA reported present.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

# Modules whose global name ``torch`` is replaced by the CPU view. Items 1, 2, 3 and 5 above.
PATCHED_MODULES: tuple[str, ...] = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "as_tensor")


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:1"``, an int, ``torch.device``) to ``"cpu"``."""
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


class _NullStream:
    """Stands in for a CUDA stream: waiting and synchronising are no-ops on the CPU."""

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None


class _CpuCuda:
    """``torch.cuda`` as megatron's CPU-patched modules see it: no CUDA device, whatever the host
    has. Anything not defined here is the real ``torch.cuda``."""

    def __init__(self, real_cuda: types.ModuleType) -> None:
        self._real = real_cuda
        # megatron's RNG helpers call torch.cuda.random.get_rng_state(device=...).
        self.random = types.SimpleNamespace(
            get_rng_state=lambda device=None: torch.get_rng_state(),
            set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    # --- device and synchronisation -----------------------------------------------------------
    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def Stream(*args: Any, **kwargs: Any) -> _NullStream:  # noqa: N802 (mirrors torch.cuda.Stream)
        return _NullStream()

    @staticmethod
    def stream(*args: Any, **kwargs: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    # --- RNG: the "device generator" is the CPU generator --------------------------------------
    @staticmethod
    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch:
    """``torch`` as megatron's CPU-patched modules see it: CUDA factories land on the CPU."""

    def __init__(self, real: types.ModuleType) -> None:
        self._real = real
        self.cuda = _CpuCuda(real.cuda)
        for name in _FACTORIES:
            setattr(self, name, self._wrap_factory(getattr(real, name)))

    @staticmethod
    def _wrap_factory(fn: Any) -> Any:
        def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            # pin_memory needs an accelerator.
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _cuda_type_names() -> Any:
    """While active, ``Tensor.type()`` names CPU tensors as their CUDA counterparts and
    ``Tensor.cuda()`` leaves them where they are.

    Only around a few methods of megatron's mixed-precision and distributed optimizers: their
    parameter classification compares with 'torch.cuda.*Tensor' names (the dtype decides the same
    way on the CPU) and their checkpoint gather moves buffers with ``.cuda()``.
    """
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw:
            name = original_type(self)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


def _with_cuda_type_names(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _cpu_get_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """megatron's ``clip_grad_by_total_norm_fp32`` with its CUDA type assertion made a dtype check.

    Same arithmetic: grads are scaled in place by ``max_norm / (total_norm + 1e-6)`` when that
    coefficient is below 1.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        if g.dtype != torch.float32:
            raise TypeError(f"gradient clipping expects fp32 grads, got {g.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


# What revert() runs, last first: one undo per change apply() made.
_UNDO: list[Callable[[], None]] = []


def _patch(obj: Any, name: str, value: Any) -> None:
    """``setattr(obj, name, value)``, remembering how to undo it."""
    if name in vars(obj):
        original = vars(obj)[name]
        _UNDO.append(lambda: setattr(obj, name, original))
    else:  # inherited or absent: removing the patch exposes it again
        _UNDO.append(lambda: delattr(obj, name))
    setattr(obj, name, value)


def apply() -> None:
    """Make megatron-core run on the CPU, whether or not this machine has CUDA. Idempotent."""
    if _UNDO:
        return
    cpu_torch = _CpuTorch(torch)
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module a given megatron-core release does not have
            continue
        _patch(module, "torch", cpu_torch)

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    _patch(random, "_get_cuda_rng_state", _cpu_get_cuda_rng_state)
    _patch(random, "_set_cuda_rng_state", _cpu_set_cuda_rng_state)
    # The tracker's fork() warns when the CPU RNG moves inside it; on the CPU the forked state IS
    # the CPU generator, so that warning would fire on every dropout call and means nothing here.
    random_logger = logging.getLogger(random.__name__)
    level = random_logger.level
    _UNDO.append(lambda: random_logger.setLevel(level))
    random_logger.setLevel(logging.ERROR)

    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    _patch(optimizer, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib.DistributedOptimizer):
        _patch(cls, "__init__", _with_cuda_type_names(cls.__init__))
    _patch(distrib.DistributedOptimizer, "get_parameter_state_dp_zero",
           _with_cuda_type_names(distrib.DistributedOptimizer.get_parameter_state_dp_zero))


def revert() -> None:
    """Undo :func:`apply`: megatron's modules see the real ``torch`` again. Objects built while
    applied (buffers, optimizers) stay on the CPU. Idempotent."""
    while _UNDO:
        _UNDO.pop()()


def is_applied() -> bool:
    """Whether :func:`apply` is in effect in this process."""
    return bool(_UNDO)
