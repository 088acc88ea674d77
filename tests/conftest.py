"""Session fixtures for the whole suite; the helpers tests import live in tests/helpers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers.runs import REPO


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# Caches Python and the linters keep next to the sources; they are not outputs of a test.
_CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".import_linter_cache"}


def _untracked_paths() -> set[tuple[str, str]] | None:
    """(git status code, path) of every untracked and ignored file in the checkout, caches left
    out; None where the tree is not a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "-z", "--ignored",
                              "--untracked-files=all"], cwd=REPO, capture_output=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    entries = set()
    for entry in out.decode(errors="replace").split("\0"):
        code, path = entry[:2], entry[3:]
        if code in ("??", "!!") and not _CACHES.intersection(Path(path).parts):
            entries.add((code, path))
    return entries


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Fail the session if tests wrote into the checkout: a new ignored file (runs/, outputs/,
    build/, ...) anywhere, or a new untracked file or folder at the top level (wandb/, logs/).
    New untracked files inside existing folders are not counted, since sources are edited while
    tests run; tests write under tmp_path."""
    before = _untracked_paths()
    yield
    after = _untracked_paths()
    if before is None or after is None:
        return
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    top = {Path(path).parts[0] for path in tracked if path}
    top |= {Path(path).parts[0] for _, path in before}
    new = sorted(path for code, path in after - before
                 if code == "!!" or Path(path).parts[0] not in top)
    if new:
        pytest.fail("tests wrote into the checkout " + str(REPO) + " (or another process did "
                    "while they ran, e.g. a benchmark writing runs/):\n  "
                    + "\n  ".join(new[:50]), pytrace=False)
