"""Device selection (megarank.parallel.runtime.select_device): each process takes the GPU of its
LOCAL_RANK, and a process started beyond the node's GPUs stops before anything is built, saying
how many processes to start. CUDA is faked at torch.cuda's boundary (present, one device)."""

from __future__ import annotations

import pytest
import torch

from megarank.parallel import cpu_compat, runtime
from megarank.parallel.runtime import select_device


@pytest.fixture
def one_gpu(monkeypatch) -> list:
    """torch.cuda reports one device; the devices taken by set_device (none really)."""
    taken = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", taken.append)
    return taken


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch, one_gpu):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert select_device("auto") == torch.device("cuda", 0)
    assert select_device("cuda") == torch.device("cuda", 0)
    assert one_gpu == [0, 0]


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_a_rank_beyond_the_gpus_stops_naming_the_processes_to_start(monkeypatch, one_gpu,
                                                                    requested):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError) as stopped:
        select_device(requested)
    message = str(stopped.value)
    assert message.startswith("LOCAL_RANK 1 has no GPU: this node has 1 CUDA device ")
    assert "torchrun --nproc_per_node 1 (python -m megarank.quickstart --nproc 1)" in message
    assert "trainer.device=cpu" in message
    assert one_gpu == []
    # On the CPU the same rank is fine: it takes no GPU.
    assert select_device("cpu") == torch.device("cpu")


def test_init_runtime_stops_before_the_process_group(monkeypatch, one_gpu):
    """Nothing is set up for a rank without a GPU: no process group, no CPU layer change."""
    started = []
    monkeypatch.setattr(runtime, "init_distributed", lambda *a, **k: started.append("dist"))
    monkeypatch.setattr(cpu_compat, "apply", lambda: started.append("apply"))
    monkeypatch.setattr(cpu_compat, "revert", lambda: started.append("revert"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"--nproc_per_node 1"):
        runtime.init_runtime(1, 1, 0)
    assert started == [] and one_gpu == []
