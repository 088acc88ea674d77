"""The import contracts (.importlinter at the repository root) hold, and they do catch a breach.

A breach is shown on a copy of the package under another name (``megarank_probe``): the ranking
module (data layer) importing the ``evaluate`` command breaks the command and layer contracts;
the encoder importing the specs that import it breaks the no-cycles contract, naming the package;
a command importing a library module other than megarank.api and megarank.config breaks the
thin-commands contract.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / ".importlinter"
WORD = re.compile(r"\bmegarank\.")


def _lint(config: Path, capsys) -> tuple[int, str]:
    code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    return code, capsys.readouterr().out


def _lint_probe(tmp_path, capsys, monkeypatch, module: str, line: str) -> tuple[int, str]:
    """Lint a copy of the package named megarank_probe, with ``line`` appended to ``module``."""
    probe = tmp_path / "megarank_probe"
    shutil.copytree(REPO / "megarank", probe, ignore=shutil.ignore_patterns("assets", "conf",
                                                                          "__pycache__"))
    for py in probe.rglob("*.py"):
        py.write_text(WORD.sub("megarank_probe.", py.read_text()))
    target = probe / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    config = tmp_path / ".importlinter"
    config.write_text(re.sub(r"\bmegarank\b", "megarank_probe", CONTRACT.read_text()))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        return _lint(config, capsys)
    finally:
        for name in [m for m in sys.modules if m.startswith("megarank_probe")]:
            del sys.modules[name]


def test_the_import_contract_holds(capsys):
    code, out = _lint(CONTRACT, capsys)
    assert code == 0, out
    assert "4 kept, 0 broken" in out


def test_the_contract_fails_when_the_library_imports_a_command(tmp_path, capsys, monkeypatch):
    code, out = _lint_probe(tmp_path, capsys, monkeypatch, "data/ranking.py",
                            "import megarank_probe.evaluate")
    assert code != 0
    assert "The library never imports a command BROKEN" in out
    assert "Library layers: each imports only the ones below it BROKEN" in out
    assert "megarank_probe.data.ranking -> megarank_probe.evaluate" in out


def test_the_contract_fails_when_two_model_files_import_each_other(tmp_path, capsys,
                                                                   monkeypatch):
    code, out = _lint_probe(tmp_path, capsys, monkeypatch, "models/encoder.py",
                            "import megarank_probe.models.specs")
    assert code != 0
    assert "3 kept, 1 broken" in out and "No import cycles between sibling modules BROKEN" in out
    assert "No cycles are allowed in megarank_probe.models." in out


def test_the_contract_fails_when_a_command_goes_around_the_api(tmp_path, capsys, monkeypatch):
    code, out = _lint_probe(tmp_path, capsys, monkeypatch, "score.py",
                            "from megarank_probe.data.triplets import read_pairs")
    assert code != 0
    assert "3 kept, 1 broken" in out
    assert "Commands use only megarank_probe.api and megarank_probe.config BROKEN" in out
    assert "megarank_probe.score -> megarank_probe.data.triplets" in out


@pytest.mark.parametrize("old, new", [
    ("megarank.stage", "megarank.bundle"), ("megarank.training.plan", "megarank.training.sizing"),
    ("megarank.eval.compare", "megarank.eval.run_curves"),
    ("megarank.checkpoint.dist", "megarank.checkpoint.sharded"),
    ("megarank.checkpoint.contract", "megarank.data.contract"),
])
def test_renamed_modules_leave_no_alias_behind(old, new):
    """A name that misled was replaced, not kept beside its new one."""
    import importlib.util

    assert importlib.util.find_spec(new) is not None
    assert importlib.util.find_spec(old) is None
