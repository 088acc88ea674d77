"""megarank stays readable: no function in the package (the training loop, checkpoints,
validation, serving, the commands) is longer than 60 lines (nested functions counted on their
own too). A longer one is split into named helpers; the failure names each as
file:function:length."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("megarank",)
LIMIT = 60


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(name, lines) of every function and method in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_function_is_longer_than_the_limit():
    files = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
    assert files, "no source files found"
    too_long = [f"{path.relative_to(REPO)}:{name}:{length}" for path in files
                for name, length in function_lengths(path) if length > LIMIT]
    assert not too_long, f"functions over {LIMIT} lines: " + ", ".join(too_long)
