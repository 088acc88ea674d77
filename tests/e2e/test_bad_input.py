"""Bad training data stops a run at start with the file and line, before any step or checkpoint."""

from __future__ import annotations

import json

from tests.helpers.runs import run_train


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


def test_checkpoint_that_does_not_fit_the_config_is_refused(tmp_path):
    init = tmp_path / "init"
    run_train(["model=bert_tiny", f"trainer.output_dir={init}", "trainer.stop_at_step=0",
               "trainer.eval_at_end=false"])
    proc = run_train(["model=bert_tiny", "model.ffn_hidden_size=96", f"model.init_from={init}",
                      f"trainer.output_dir={tmp_path}/run", "trainer.max_steps=1"], check=False)
    assert proc.returncode != 0
    assert "the checkpoint does not fit the model built from the config" in proc.stderr
    assert "step_0000000" in proc.stderr


def test_distillation_without_teacher_scores_stops_naming_record_and_field(tmp_path):
    rows = [{"query": "q", "pos": ["a"], "neg": ["b", "c"], "pos_scores": [0.9],
             "neg_scores": [0.1, 0.2]},
            {"query": "q2", "pos": ["d"], "neg": ["e", "f"]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = run_train(["model=bert_tiny", f"data.train_path={path}", f"trainer.output_dir={out}",
                      "trainer.max_steps=2", "task.group_size=2", "task.loss=distill"],
                     check=False)
    assert proc.returncode != 0
    assert f"{path}:2: record has no teacher scores" in proc.stderr
    assert "task.loss=distill" in proc.stderr
    assert not (out / "checkpoints" / "latest").exists()
