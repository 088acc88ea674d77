"""`megarank <command>` dispatches to every command module, and each one answers --help.

The dispatch runs in this process (``megarank.cli.main``); one test runs the installed
``megarank`` console script as its own process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megarank.cli import COMMANDS
from tests.helpers.runs import REPO, run_cli


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command, monkeypatch):
    # train answers with Hydra's help, the others with argparse's; `megarank train` hands
    # Hydra its arguments through sys.argv, which the test gives back afterwards.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    proc = run_cli("megarank.cli", [command, "--help"], check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_unknown_command_is_an_error():
    proc = run_cli("megarank.cli", ["nope"], check=False)
    assert proc.returncode == 2 and "usage: megarank" in proc.stderr


def _console_script() -> list[str]:
    """The ``megarank`` executable pip installed next to this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / "megarank"
    found = str(beside) if beside.is_file() else shutil.which("megarank")
    assert found, "the megarank console script is not installed (pip install -e .)"
    return [found]


def test_console_script_runs_a_command():
    # The entry point pyproject.toml declares, in a fresh process: Hydra's help of train (the
    # command that reads sys.argv), then an unknown command.
    proc = subprocess.run([*_console_script(), "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "megarank train" in proc.stdout or "Powered by Hydra" in proc.stdout, proc.stdout
    proc = subprocess.run([*_console_script(), "nope"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage: megarank" in proc.stderr


def test_importing_the_api_leaves_the_heavy_libraries_unloaded():
    # Every command imports megarank.api at start; what only some commands use is imported
    # where it is used (bm25s: 0.5 s of every start when it was imported at the top).
    proc = subprocess.run([sys.executable, "-c", "import sys, megarank.api; print(sorted(m for m "
                           "in ('bm25s', 'torch', 'sentence_transformers') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
