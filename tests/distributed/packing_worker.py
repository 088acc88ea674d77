"""Run several short training runs in ONE torchrun launch (each rank keeps its interpreter;
megatron's parallel state and the process group are rebuilt per run), then write every run's
logged losses and gradient norms to a JSON file.

    torchrun --nproc_per_node 2 -m tests.distributed.packing_worker CASES.json OUT.json

CASES.json: {"name": [overrides...], ...}. Each run's process group rendezvouses through a file
of its own beside OUT.json (megarank's runtime finds the group initialised and uses it), so a
re-initialised group needs no port and never reads the addresses of the one before it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def main(cases_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from megarank.config import compose
    from megarank.training.loop import train

    cases = json.loads(Path(cases_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    with tempfile.TemporaryDirectory(prefix="megarank-cases-") as tmp:
        for i, (name, overrides) in enumerate(cases.items()):
            dist.init_process_group("gloo", init_method=f"file://{out_path}.rdzv{i}",
                                    rank=rank, world_size=world)
            out = Path(tmp) / name
            train(compose([*overrides, f"trainer.output_dir={out}",
                           "trainer.progress_bar=false"]))
            if rank == 0:
                records = [json.loads(line) for line in (out / "metrics.jsonl").read_text()
                           .splitlines() if '"loss"' in line]
                results[name] = records
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
