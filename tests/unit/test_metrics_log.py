"""metrics.jsonl survives a run killed mid-write: the resumed run cuts the half line off."""

from __future__ import annotations

import json

from megarank.training.logs import _drop_partial_line


def test_a_half_written_line_is_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.4')
    _drop_partial_line(path)
    with open(path, "a") as f:
        f.write('{"step": 2, "loss": 1.4}\n')
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_complete_file_is_left_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\n{"step": 2}\n'
    path.write_text(text)
    _drop_partial_line(path)
    assert path.read_text() == text
    _drop_partial_line(tmp_path / "absent.jsonl")  # a fresh run: nothing to do
