"""Whether a plan fits a GPU: known cards' memory, the fit with headroom, and the memory settings
that would make a plan fit."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megarank.training.sizing.records import GIB, HEADROOM, RECOMPUTE, MemoryPlan

# Memory of known cards in GiB, as NVIDIA's datasheets print it (HBM/GDDR capacities are binary:
# the "80 GB" of an H100 is 80 GiB of HBM3). Names match case-insensitively, with or without the
# size when a card comes in one size only: H100 (SXM and PCIe 80 GB; the NVL has 94 GB), H200
# 141 GB, A100 40/80 GB, L40S 48 GB, L4 24 GB, A10 24 GB, B200 180 GB (per GPU of an HGX B200).
GPUS: dict[str, float] = {
    "H100-80GB": 80.0,
    "H100-NVL-94GB": 94.0,
    "H200-141GB": 141.0,
    "A100-80GB": 80.0,
    "A100-40GB": 40.0,
    "L40S-48GB": 48.0,
    "L4-24GB": 24.0,
    "A10-24GB": 24.0,
    "B200-180GB": 180.0,
}


@dataclass(frozen=True)
class Fit:
    """Whether a plan's largest stage fits one GPU."""

    gpu: str
    """The card (a name from GPUS, or the size given)."""
    capacity: int
    """Bytes on the card."""
    usable: int
    """capacity less the headroom left free."""
    needed: int
    """Bytes per GPU of the plan's largest stage."""

    @property
    def fits(self) -> bool:
        """needed <= usable."""
        return self.needed <= self.usable

    @property
    def spare(self) -> int:
        """usable - needed (negative: short by that much)."""
        return self.usable - self.needed


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.upper())


def gpu_memory(gpu: str) -> tuple[str, int]:
    """(name, bytes) of a known card (``H100-80GB``, ``h100``, ``A100-40GB``, ...) or of a size
    (``80GB`` / ``80GiB`` / ``80``: GiB). An unknown name is refused with the known ones listed."""
    size = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GIB|G)?\s*", gpu.upper())
    if size:
        return f"{float(size.group(1)):g} GiB", int(float(size.group(1)) * GIB)
    key = _key(gpu)
    exact = [n for n in GPUS if _key(n) == key]
    # A bare model name (H100) matches the card of that name when it comes in one size.
    prefix = [n for n in GPUS if _key(n).startswith(key) and _key(n)[len(key):len(key) + 1]
              .isdigit()]
    hits = exact or (prefix if len(prefix) == 1 else [])
    if not hits:
        raise ValueError(f"unknown GPU {gpu!r}: give a memory size (e.g. 80GB) or one of "
                         f"{', '.join(GPUS)}")
    return hits[0], int(GPUS[hits[0]] * GIB)


def fit(plan: MemoryPlan, gpu: str, headroom: float = HEADROOM, recompute: str | None = None,
        distributed_optimizer: bool | None = None) -> Fit:
    """Whether the plan's largest stage fits ``gpu`` with ``headroom`` of it left free."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom ({headroom}) must be in [0, 1)")
    name, capacity = gpu_memory(gpu)
    return Fit(name, capacity, int(capacity * (1 - headroom)),
               plan.total(recompute, distributed_optimizer))


def suggestions(plan: MemoryPlan, gpu: str, headroom: float = HEADROOM) -> list[str]:
    """Changes to the config's memory settings that make the plan fit ``gpu``, each with the
    bytes per GPU it would need (empty when it fits, or when no such change fits)."""
    out = []
    options = [(r, z) for z in (plan.distributed_optimizer, True) for r in RECOMPUTE]
    for r, z in dict.fromkeys(options):
        if (r, z) == (plan.recompute, plan.distributed_optimizer):
            continue
        f = fit(plan, gpu, headroom, r, z)
        if f.fits:
            change = [f"trainer.recompute={r}"] if r != plan.recompute else []
            if z != plan.distributed_optimizer:
                change.append("parallel.use_distributed_optimizer=true")
            out.append(f"{' '.join(change)} ({f.needed / GIB:.1f} GiB)")
    return out
