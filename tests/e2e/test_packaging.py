"""The built wheel is complete on its own: installed (not editable) into a fresh virtual environment
that reuses the installed dependencies, it composes and validates a config from outside the
checkout, with the config tree and the assets read from the installed package."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.runs import REPO

CONF = REPO / "megarank" / "conf"
# Junk a working tree may hold that does not belong in a wheel built from it.
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # No PYTHONPATH: nothing may put the checkout back on the path of the installed interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Wheel built from a copy of the sources (the build writes build/ and *.egg-info next to
    them), installed with --no-deps into a venv with --system-site-packages."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "megarank", src / "megarank", ignore=JUNK)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation",
          "--no-index", "-w", dist], cwd=tmp)
    (wheel,) = dist.glob("megarank-*.whl")
    venv = tmp / "venv"
    # No pip of its own: the system site-packages provide it (and every dependency).
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # The tests run in a virtual environment themselves: --system-site-packages reaches the
        # base interpreter's packages only, so the new one also reads this one's, after its own.
        purelib = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        (purelib / "site-packages" / "zz_parent_env.pth").write_text("import site; " + "; ".join(
            f"site.addsitedir({d!r})" for d in site.getsitepackages()) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=tmp)
    work = tmp / "work"  # the cwd of every command below: outside the checkout, empty
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "work": work}


def test_wheel_ships_the_config_tree(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in CONF.rglob("*.yaml")}
    assert "megarank/conf/train.yaml" in shipped and len(shipped) > 20
    assert shipped <= names, sorted(shipped - names)


SCRIPT = r"""
import json, sys
from pathlib import Path

venv, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import megarank
from megarank.config import CONF_DIR, compose, validate

pkg = Path(megarank.__file__).resolve().parent
# The wheel's copy, not the editable install's finder in the system site-packages.
assert pkg.is_relative_to(venv), pkg
assert not pkg.is_relative_to(repo), pkg
conf = Path(CONF_DIR).resolve()
assert conf == pkg / "conf" and conf.is_relative_to(venv), conf
groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in conf.iterdir() if d.is_dir()}

cfg = compose(["model=bert_tiny", "parallel=tp2_pp1", "task=pairwise",
               "trainer.global_batch_size=8", "trainer.micro_batch_size=2"])
d = validate(cfg, world_size=2)
print(json.dumps({
    "package": str(pkg), "groups": groups,
    "tp": d.tp, "pp": d.pp, "dp": d.dp, "num_microbatches": d.num_microbatches,
    "pairs_per_micro_batch": d.pairs_per_micro_batch,
    "model": cfg.model.name, "loss": cfg.task.loss, "group_size": cfg.task.group_size,
    "train_path": cfg.data.train_path,
}))
"""


def test_installed_wheel_composes_and_validates(installed):
    work, venv = installed["work"], installed["venv"]
    proc = _run([installed["python"], "-c", SCRIPT, venv, REPO], cwd=work)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(venv.resolve())
    assert (out["tp"], out["pp"], out["dp"]) == (2, 1, 1)
    assert out["num_microbatches"] == 4  # 8 / (2 per micro-batch x dp 1)
    assert (out["model"], out["loss"], out["group_size"]) == ("bert_tiny", "pairwise", 4)
    assert out["pairs_per_micro_batch"] == 2 * 4  # micro-batch x task/pairwise.yaml's group
    # ${asset:...} resolves into the installed package's assets too, and the file is there.
    train_path = Path(out["train_path"])
    assert train_path.is_relative_to(venv.resolve()) and train_path.is_file(), train_path
    # Every config group of the checkout is listed in the installed package, file for file.
    expected = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF.iterdir()
                if d.is_dir()}
    assert out["groups"] == expected
    assert list(work.iterdir()) == []


def test_installed_train_entry_point_finds_its_configs(installed):
    # `@hydra.main(config_path=CONF_DIR)` of the installed megarank.train: --cfg job prints the
    # composed config and exits before training.
    work = installed["work"]
    proc = _run([installed["python"], "-m", "megarank.train", "--cfg", "job", "--resolve",
                 "model=bert_tiny", "parallel=tp2_pp1", "task=pairwise"], cwd=work)
    assert "name: bert_tiny" in proc.stdout and "loss: pairwise" in proc.stdout
    assert "tensor_model_parallel_size: 2" in proc.stdout
    assert str(installed["venv"].resolve() / "lib") in proc.stdout  # assets from the venv
    assert str(REPO) not in proc.stdout
    assert list(work.iterdir()) == []
