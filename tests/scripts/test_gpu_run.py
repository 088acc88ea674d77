"""benchmarks/gpu_run.sh, the GPU measurement as one command: it runs only where a GPU is lent,
for minutes that cannot be spent on a typo, so its shell and every Python command line in it are
checked here: bash syntax, shellcheck, and each benchmark script's own argument parser given the
script's arguments (parsed, not run)."""

from __future__ import annotations

import argparse
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "gpu_run.sh"


class _Parsed(Exception):
    """Raised in place of running a script once its arguments parsed."""


def _joined() -> str:
    """gpu_run.sh with its continuation lines joined."""
    return SCRIPT.read_text().replace("\\\n", " ")


def _python_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every ``python3 $B/<script>.py ...`` in gpu_run.sh, each command
    ending at ``&&``, a quote or the end of its line."""
    text = _joined()
    commands = []
    for m in re.finditer(r"python3 \$B/(\S+\.py)([^\"&\n]*)", text):
        commands.append((m.group(1), m.group(2).split()))
    return commands


def test_gpu_run_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is not None:
        out = subprocess.run(["shellcheck", str(SCRIPT.relative_to(REPO))], cwd=REPO,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_benchmark_command_in_gpu_run_parses(monkeypatch):
    """A misspelt or removed flag makes the script's parser exit 2, and a model, head or peer
    system the scripts do not know stops them later: both caught here, not on the GPU."""

    commands = _python_commands()
    scripts = {s for s, _ in commands}
    assert {"packing_parity.py", "gpu_decoder.py", "peers.py"} <= scripts, scripts
    assert len(commands) >= 5  # parity, the peers' decoder, encoder and realistic runs, a budget
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    parsed = []
    for script, args in commands:
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(_Parsed) as e:
            runpy.run_path(str(REPO / "benchmarks" / script), run_name="__main__")
        parsed.append((script, e.value.args[0]))
    peers = load_benchmark("peers", monkeypatch)
    models = {p.stem for p in (REPO / "megarank" / "conf" / "model").glob("*.yaml")}
    for script, ns in parsed:
        if script == "gpu_decoder.py":
            assert ns.model in models, ns.model
            assert set(ns.heads.split(",")) <= {"classifier", "yes_no", "full"}, ns.heads
        elif script == "peers.py":
            assert set(ns.systems.split(",")) <= set(peers.SYSTEMS), ns.systems
        elif script == "packing_parity.py":
            assert set(ns.models.split(",")) <= models, ns.models


def _steps() -> dict[str, list[tuple[str, int, str]]]:
    """Phase -> its ``step NAME TIMEOUT command`` lines, as (name, timeout, command)."""
    phases: dict[str, list[tuple[str, int, str]]] = {"1": [], "2": []}
    phase = None
    for line in _joined().splitlines():
        line = line.strip()
        if line.startswith('if [ "$PHASE" = 1 ]'):
            phase = "1"
        elif line == "else" and phase == "1":
            phase = "2"
        elif line == "fi":
            phase = None
        elif line.startswith("step ") and not line.startswith("step()"):
            assert phase is not None, f"a step outside the phases: {line}"
            _, name, timeout, command = line.split(maxsplit=3)
            phases[phase].append((name, int(timeout), command))
    return phases


def test_each_phase_fits_one_command_and_peers_steps_outlast_their_systems():
    """A device command runs at most 600 s and a device session has one or two of them: each
    phase's step timeouts add up to at most 560 s (the rest: the install and the header). A
    peers step killed by its own timeout would print no table at all, so it must outlast every
    one of its system processes at their --child-timeout (a slow system then costs its row)."""
    phases = _steps()
    assert phases["1"] and phases["2"]
    for phase, steps in phases.items():
        assert sum(t for _, t, _ in steps) <= 560, (phase, steps)
        for name, timeout, command in steps:
            if "peers.py" not in command:
                continue
            args = command.split()
            child = int(args[args.index("--child-timeout") + 1])
            systems = len(args[args.index("--systems") + 1].split(","))
            geometry = args[args.index("--geometry") + 1]
            processes = systems * (2 if geometry == "both" else 1)
            assert timeout >= processes * child + 5, (name, timeout, processes, child)
