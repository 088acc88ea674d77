"""Bad training data stops a run at start with the file and line, before any step or checkpoint.

The runs train in this process (``megarank.train_model``): the refusal is the exception the
command would print, and its message is what is checked."""

from __future__ import annotations

import json

import pytest

import megarank
from megarank.config import ConfigError
from megarank.data.triplets import DataFormatError

BASE = ["model=bert_tiny", "trainer.progress_bar=false"]


def test_malformed_row_stops_the_run_naming_file_and_line(tmp_path):
    good = {"query": "q", "pos": ["a"], "neg": ["b", "c"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"query": "q", "neg": ["b"]}\n')
    out = tmp_path / "run"
    with pytest.raises(DataFormatError) as err:
        megarank.train_model([*BASE, f"data.train_path={bad}", f"trainer.output_dir={out}",
                              "trainer.max_steps=2", "task.group_size=2"])
    assert f"{bad}:3:" in str(err.value)
    assert "pos" in str(err.value)
    assert not (out / "checkpoints" / "latest").exists()
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""


def test_checkpoint_that_does_not_fit_the_config_is_refused(tmp_path):
    init = tmp_path / "init"
    megarank.train_model([*BASE, f"trainer.output_dir={init}", "trainer.stop_at_step=0",
                          "trainer.eval_at_end=false"])
    with pytest.raises(ValueError) as err:
        megarank.train_model([*BASE, "model.ffn_hidden_size=96", f"model.init_from={init}",
                              f"trainer.output_dir={tmp_path}/run", "trainer.max_steps=1"])
    assert "the checkpoint does not fit the model built from the config" in str(err.value)
    assert "step_0000000" in str(err.value)


def test_distillation_without_teacher_scores_stops_naming_record_and_field(tmp_path):
    rows = [{"query": "q", "pos": ["a"], "neg": ["b", "c"], "pos_scores": [0.9],
             "neg_scores": [0.1, 0.2]},
            {"query": "q2", "pos": ["d"], "neg": ["e", "f"]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        megarank.train_model([*BASE, f"data.train_path={path}", f"trainer.output_dir={out}",
                              "trainer.max_steps=2", "task.group_size=2", "task.loss=distill"])
    assert f"{path}:2: record has no teacher scores" in str(err.value)
    assert "task.loss=distill" in str(err.value)
    assert not (out / "checkpoints" / "latest").exists()
