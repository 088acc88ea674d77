"""The in-process tiers' guard: a test in tests/unit or tests/integration that starts a program
(``subprocess``, ``os.system``, torchrun, ``mp.spawn``) fails at once, naming the call; such tests
belong in tests/scripts (scripts and command lines) or tests/e2e (training runs). Libraries that
fork helper processes through ``multiprocessing`` (megatron's checkpoint writers, DataLoader
workers) are left alone: they run library code, not a program."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch.multiprocessing
from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler


def _refuse(what: str):
    def refuse(*args, **kwargs):
        shown = " ".join(str(a) for a in (args[0] if args and isinstance(args[0], list | tuple)
                                          else args[:1]))
        raise RuntimeError(
            f"{what}({shown[:200]}) in an in-process tier (tests/unit, tests/integration); move "
            "this test to tests/scripts or tests/e2e")

    return refuse


class _NoPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        _refuse("subprocess.Popen")(*args, **kwargs)


@pytest.fixture(autouse=True)
def no_programs(monkeypatch):
    """subprocess (and so subprocess.run / check_output / os.popen), os.system, os.posix_spawn,
    torch's mp.spawn and torchrun's worker launcher raise inside tests/unit."""
    monkeypatch.setattr(subprocess, "Popen", _NoPopen)
    monkeypatch.setattr(subprocess_handler, "Popen", _NoPopen)
    for name in ("system", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"os.{name}"))
    for name in ("spawn", "start_processes"):
        monkeypatch.setattr(torch.multiprocessing, name, _refuse(f"torch.multiprocessing.{name}"))
