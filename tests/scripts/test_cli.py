"""`megarank <command>` dispatches to every command module, and each one answers --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megarank.cli import COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command):
    # train answers with Hydra's help, the others with argparse's.
    proc = subprocess.run([sys.executable, "-c", "from megarank.cli import main; main()",
                           command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_unknown_command_is_an_error():
    proc = subprocess.run([sys.executable, "-c", "from megarank.cli import main; main()", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: megarank" in proc.stderr
