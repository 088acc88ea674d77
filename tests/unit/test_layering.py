"""The import contract (.importlinter at the repository root) holds, and it does catch a breach.

The breach is shown on a copy of the package under another name (``megarank_probe``), where the
ranking module (data layer) imports the ``evaluate`` command: both contracts must then fail, with
the offending import named.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / ".importlinter"


def _lint(config: Path, capsys) -> tuple[int, str]:
    code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    return code, capsys.readouterr().out


def test_the_import_contract_holds(capsys):
    code, out = _lint(CONTRACT, capsys)
    assert code == 0, out
    assert "2 kept, 0 broken" in out


def test_the_contract_fails_when_the_library_imports_a_command(tmp_path, capsys, monkeypatch):
    probe = tmp_path / "megarank_probe"
    shutil.copytree(REPO / "megarank", probe, ignore=shutil.ignore_patterns("assets", "conf",
                                                                          "__pycache__"))
    word = re.compile(r"\bmegarank\.")
    for py in probe.rglob("*.py"):
        py.write_text(word.sub("megarank_probe.", py.read_text()))
    ranking = probe / "data" / "ranking.py"
    ranking.write_text(ranking.read_text() + "\nimport megarank_probe.evaluate  # noqa\n")
    config = tmp_path / ".importlinter"
    text = CONTRACT.read_text().replace("root_package = megarank", "root_package = megarank_probe")
    config.write_text(word.sub("megarank_probe.", text))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code, out = _lint(config, capsys)
    finally:
        for name in [m for m in sys.modules if m.startswith("megarank_probe")]:
            del sys.modules[name]
    assert code != 0
    assert "0 kept, 2 broken" in out
    assert "megarank_probe.data.ranking -> megarank_probe.evaluate" in out
