"""`megarank compare`: two real short training runs (their metrics.jsonl as the trainer writes
them) side by side: the CSV and markdown tables hold exactly the logged numbers, the PNG is
written, and bad input names the file and line."""

from __future__ import annotations

import csv
import json
import sys

import pytest

import megarank
from megarank.eval.run_curves import load_runs, read_curves
from tests.helpers.artefacts import short_run_overrides, train_in_process


@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """bert_tiny trained 6 steps twice (listwise: the session's short run; then ranknet at
    another learning rate), evaluated on 8 Cranfield test queries at steps 0, 3 and 6."""
    ranknet = tmp_path_factory.mktemp("compare") / "ranknet"
    train_in_process(short_run_overrides(ranknet, "ranknet", "3e-3", save_final=False))
    return [tiny_run, ranknet]


def _logged(run_dir):
    """step -> the merged records of that step, straight from metrics.jsonl."""
    steps: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        steps.setdefault(r["step"], {}).update(r)
    return steps


def test_compare_writes_table_and_plot_with_the_logged_numbers(two_runs, tmp_path, capsys):
    a, b = two_runs
    paths = megarank.compare_runs([a, b], tmp_path / "cmp", verbose=True)
    assert set(paths) == {"csv", "markdown", "plot"}
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| listwise |" in capsys.readouterr().out  # the summary printed

    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    metrics = ["loss", "eval/MRR@10", "eval/NDCG@10", "eval/Recall@10"]
    assert header == ["step"] + [f"{r}/{m}" for m in metrics for r in ("listwise", "ranknet")]
    assert [int(r["step"]) for r in rows] == list(range(7))
    for name, run in (("listwise", a), ("ranknet", b)):
        logged = _logged(run)
        for row in rows:
            rec = logged.get(int(row["step"]), {})
            for m in metrics:
                cell = row[f"{name}/{m}"]
                if m in rec:
                    assert float(cell) == rec[m]  # full precision
                else:
                    assert cell == ""
        # evaluated at 0, 3, 6; loss at 1..6
        assert [int(r["step"]) for r in rows if r[f"{name}/eval/NDCG@10"]] == [0, 3, 6]
        assert [int(r["step"]) for r in rows if r[f"{name}/loss"]] == [1, 2, 3, 4, 5, 6]
    # the two runs trained differently: their curves differ
    assert [r["listwise/loss"] for r in rows] != [r["ranknet/loss"] for r in rows]

    md = paths["markdown"].read_text()
    for name, run in (("listwise", a), ("ranknet", b)):
        logged = _logged(run)
        losses = {s: r["loss"] for s, r in logged.items() if "loss" in r}
        ndcg = {s: r["eval/NDCG@10"] for s, r in logged.items() if "eval/NDCG@10" in r}
        low = min(losses, key=lambda s: (losses[s], s))
        top = min(ndcg, key=lambda s: (-ndcg[s], s))
        summary = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in summary.strip("|").split("|")]
        # run, steps, loss last, loss min (step), MRR last, MRR best, NDCG last, NDCG best, ...
        assert cells[1] == "0-6"
        assert cells[2] == f"{losses[6]:.4g}" and cells[3] == f"{losses[low]:.4g} ({low})"
        assert cells[6] == f"{ndcg[6]:.4f}" and cells[7] == f"{ndcg[top]:.4f} ({top})"
        assert f"`{name}`: {run}" in md
    step3 = next(line for line in md.splitlines() if line.startswith("| 3 |"))
    assert f"{_logged(a)[3]['loss']:.4g}" in step3 and f"{_logged(b)[3]['loss']:.4g}" in step3


def test_compare_command_line(two_runs, tmp_path, monkeypatch, capsys):
    from megarank import cli

    out = tmp_path / "cmd"
    monkeypatch.setattr(sys, "argv", ["megarank", "compare", *map(str, two_runs), "--out",
                                      str(out), "--names", "A", "B"])
    cli.main()
    assert "wrote" in capsys.readouterr().out
    header = (out / "comparison.csv").read_text().splitlines()[0]
    assert header.startswith("step,A/loss,B/loss,A/eval/MRR@10,B/eval/MRR@10")
    assert (out / "comparison.png").stat().st_size > 10_000
    # The library names its parameter (names); the command says its flag.
    with pytest.raises(SystemExit, match="^megarank compare: --names gives 1 names for 2 runs"):
        cli.main(["compare", *map(str, two_runs), "--out", str(out), "--names", "A"])


def test_resumed_steps_take_the_later_record_and_bad_lines_name_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
        '{"step": 2, "loss": 1.25, "eval/NDCG@10": 0.5}\n{"step": 3, "loss": NaN}\n')
    curves = read_curves(run).curves
    assert curves["loss"][2] == 1.25 and curves["eval/NDCG@10"] == {2: 0.5}
    assert read_curves(run).best("loss") == (2, 1.25)  # a NaN loss is never the best
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:5: not a JSON record"):
        read_curves(run)
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: a record needs an integer 'step'"):
        read_curves(run)
    with pytest.raises(FileNotFoundError, match=r"nothing[/\\]metrics\.jsonl"):
        read_curves(tmp_path / "nothing")
    with pytest.raises(ValueError, match="^names gives 1 names for 2 runs"):
        load_runs([run, run], ["x"])
