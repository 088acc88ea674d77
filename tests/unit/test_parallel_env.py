"""megarank.parallel.env reads torchrun's variables (and nothing else does), and
megarank.parallel.runtime.cpu_process_group owns a group only when it made one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megarank.parallel.env import (
    env_local_rank,
    env_rank,
    env_world_size,
    group_rank_and_size,
    is_main_process,
    launched_by_torchrun,
)
from megarank.parallel.runtime import cpu_process_group, init_distributed, shutdown

PACKAGE = Path(__file__).resolve().parents[2] / "megarank"


@pytest.fixture
def plain(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_plain_process_is_rank_0_of_a_world_of_one(plain):
    assert (env_rank(), env_local_rank(), env_world_size()) == (0, 0, 1)
    assert is_main_process() and not launched_by_torchrun()
    assert env_world_size(default=0) == 0


def test_torchrun_variables_are_read(plain):
    plain.setenv("RANK", "3")
    plain.setenv("LOCAL_RANK", "1")
    plain.setenv("WORLD_SIZE", "4")
    assert (env_rank(), env_local_rank(), env_world_size()) == (3, 1, 4)
    assert not is_main_process() and launched_by_torchrun()


def test_a_bad_variable_is_named(plain):
    plain.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE \('two'\) must be an integer"):
        env_world_size()


def test_no_other_module_reads_the_rank_variables():
    reads = re.compile(r"(environ|getenv)[^\n]*\b(RANK|LOCAL_RANK|WORLD_SIZE)\b")
    found = [f"{p.relative_to(PACKAGE)}:{n}" for p in PACKAGE.rglob("*.py")
             if p.name != "env.py" for n, line in enumerate(p.read_text().splitlines(), 1)
             if reads.search(line)]
    assert not found, f"read RANK/LOCAL_RANK/WORLD_SIZE through megarank.parallel.env: {found}"


def test_group_view_and_ownership(plain, monkeypatch):
    assert group_rank_and_size() == (0, 1)
    with cpu_process_group() as owns:  # a world of one: nothing to share, no group made
        assert owns is False and not dist.is_initialized()
    init_distributed(torch.device("cpu"))  # a group already up (a run's): used, not owned
    try:
        plain.setenv("WORLD_SIZE", "2")
        with cpu_process_group() as owns:
            assert owns is False
        assert dist.is_initialized() and group_rank_and_size(dist.group.WORLD) == (0, 1)
        # The group's answer, not a default: a group that says rank 2 of 5 is believed.
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 5)
        assert group_rank_and_size() == (2, 5)
        monkeypatch.undo()
    finally:
        shutdown()


def test_a_world_of_one_leaves_no_rendezvous_file(plain):
    """Every in-process run (tests, the API) brings a world of one up and down; each left its
    rendezvous file in the temporary directory (hundreds a suite) until shutdown removed it."""
    from megarank.parallel import runtime

    for _ in range(2):
        init_distributed(torch.device("cpu"))
        path = Path(runtime._rendezvous_file)
        dist.barrier()
        assert path.exists()
        shutdown()
        assert not dist.is_initialized() and not path.exists()
