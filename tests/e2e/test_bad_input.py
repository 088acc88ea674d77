"""Bad training data stops a run at start with the file and line, before any step or checkpoint."""

from __future__ import annotations

import json

from tests.conftest import run_train


def test_malformed_row_stops_the_run_naming_file_and_line(tmp_path):
    good = {"query": "q", "pos": ["a"], "neg": ["b", "c"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"query": "q", "neg": ["b"]}\n')
    out = tmp_path / "run"
    proc = run_train(["model=bert_tiny", f"data.train_path={bad}", f"trainer.output_dir={out}",
                      "trainer.max_steps=2", "task.group_size=2"], check=False)
    assert proc.returncode != 0
    assert f"{bad}:3:" in proc.stderr
    assert "pos" in proc.stderr
    assert not (out / "checkpoints" / "latest").exists()
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""
