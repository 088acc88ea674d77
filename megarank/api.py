"""megarank's Python API: what every command runs, callable from Python.

    import megarank

    result = megarank.train_model(["model=bert_tiny", "task=listwise", "trainer.max_steps=20"])
    with megarank.load_scorer("runs/my-run") as scorer:
        scores = scorer.score([("what is a wing?", "A wing is a surface that ...")])
    megarank.convert_to_hf("runs/my-run", "hf/my-reranker")
    megarank.evaluate_model("hf/my-reranker", "path/to/beir_collection", top_k=50)

Each function works in one process, or on every rank under torchrun (``parallel=...`` overrides
pick the layout), and shuts down the process group it brought up before it returns. The names
differ from the command modules (``megarank.train`` is ``python -m megarank.train``) so that
importing a command never hides a function.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light (no torch): what the commands read besides the functions below.
from megarank.data.mining import RETRIEVERS
from megarank.data.triplets import iter_triplets, read_pairs
from megarank.errors import ArgumentError, for_command
from megarank.parallel.env import env_world_size, is_main_process
from megarank.training.sizing import (
    HEADROOM,
    fit,
    format_plan,
    largest_token_budget,
    plan_memory,
    suggestions,
)

__all__ = ["HEADROOM", "RETRIEVERS", "ArgumentError", "Scorer", "check_teacher",
           "compare_runs", "compose_config", "convert_from_hf", "convert_to_hf",
           "env_world_size", "evaluate_model", "evaluate_tasks", "fit", "for_command",
           "format_plan", "is_main_process", "iter_triplets", "largest_token_budget",
           "load_scorer", "measure_memory", "mine_triplets", "open_engine", "plan_memory",
           "prepare_data", "read_pairs", "rerank_task", "serve_app", "ServeLimits",
           "suggestions", "train_model"]

if TYPE_CHECKING:  # the heavy imports (megatron-core, transformers) wait for the first call
    from omegaconf import DictConfig

    from megarank.bundle import Scorer
    from megarank.data.mining import MineStats
    from megarank.data.prepared import PrepareStats
    from megarank.eval.rerank import RerankTask
    from megarank.serving.engine import RerankEngine, ServeLimits
    from megarank.training.sizing import MemoryPlan


def __getattr__(name: str) -> Any:
    """``megarank.api.Scorer`` (:class:`megarank.bundle.Scorer`) and ``megarank.api.ServeLimits``
    (:class:`megarank.serving.engine.ServeLimits`), loaded on first use."""
    if name == "Scorer":
        from megarank.bundle import Scorer

        return Scorer
    if name == "ServeLimits":
        from megarank.serving.engine import ServeLimits

        return ServeLimits
    raise AttributeError(f"module 'megarank.api' has no attribute {name!r}")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The training config composed from the shipped Hydra configs with ``overrides``, as
    ``python -m megarank.train OVERRIDES`` composes it (not yet validated)."""
    from megarank.config import compose

    return compose(list(overrides))


def train_model(config: DictConfig | Sequence[str] = ()) -> dict[str, Any]:
    """Train a reranker from a composed config or from Hydra overrides; return the last logged
    record (step, loss, eval metrics). The run directory is ``trainer.output_dir``."""
    from omegaconf import DictConfig

    from megarank.training.loop import train

    cfg = config if isinstance(config, DictConfig) else compose_config(config)
    return train(cfg)


def load_scorer(model: str | Path, overrides: Sequence[str] = (), *, device: str | None = None,
                batch_size: int = 64) -> Scorer:
    """A megarank checkpoint, run directory (its latest checkpoint) or HF export, as a
    :class:`megarank.bundle.Scorer`; its ``scoring.json`` is checked against what the config
    would build."""
    from megarank.bundle import load_scorer as load

    return load(model, overrides, device=device, batch_size=batch_size)


def convert_from_hf(hf_dir: str | Path, out: str | Path, overrides: Sequence[str] = (), *,
                    adapter: str | Path | None = None) -> Path:
    """Import an HF model directory as a megarank checkpoint (under torchrun each rank reads only
    its shard of the weights, in the layout ``overrides`` ask for).

    ``adapter``: a PEFT LoRA or DoRA adapter directory for ``hf_dir``; the checkpoint is then a
    LoRA/DoRA checkpoint (adapters and head) whose base is ``hf_dir``.
    """
    from omegaconf import OmegaConf

    from megarank.bundle import build_bundle, saved_config
    from megarank.checkpoint.sharded import save_model_checkpoint
    from megarank.data.contract import FILE as CONTRACT_FILE

    lora: list[str] = []
    if adapter is not None:
        from megarank.checkpoint.adapters import adapter_targets, read_adapter

        conf, lora = read_adapter(adapter)
        probe, _ = saved_config(hf_dir, overrides)
        targets = ",".join(adapter_targets(adapter, probe))
        lora = [*lora, f"peft.targets=[{targets}]"]  # peft=lora or peft=dora first
    cfg, _ = saved_config(hf_dir, [*lora, *overrides])
    if adapter is not None and conf.get("use_dora") and cfg.peft.method != "dora":
        raise ArgumentError("{path}: {0} is a DoRA adapter (use_dora) and peft.method is "
                            "{method}: DoRA over a 4-bit base (QDoRA) is not supported, and a "
                            "DoRA adapter imports as peft=dora only", "adapter", path=adapter,
                            method=cfg.peft.method)
    out_path = Path(out).resolve()
    with build_bundle(cfg, device="cpu") as bundle:
        if adapter is not None:
            from megarank.checkpoint.adapters import load_adapter

            load_adapter(adapter, bundle.model, bundle.cfg, whole_model=bundle.runtime.pp_size == 1)
        # The contract goes in with the weights (under its own name, recorded in megarank.json),
        # so the checkpoint is never complete without it.
        staging = out_path.parent / f".{out_path.name}.contract"
        if bundle.runtime.is_main:
            staging.mkdir(parents=True, exist_ok=True)
            (staging / CONTRACT_FILE).write_text(bundle.contract.to_json())
        try:
            save_model_checkpoint(
                out_path, bundle.model, bundle.runtime,
                meta={"config": OmegaConf.to_container(bundle.cfg, resolve=True),
                      "source": str(hf_dir), "layout": bundle.derived.__dict__},
                extra_files=[staging / CONTRACT_FILE],
            )
        finally:
            if bundle.runtime.is_main:
                shutil.rmtree(staging, ignore_errors=True)
    return out_path


def convert_to_hf(checkpoint: str | Path, out: str | Path, *, as_classifier: bool = False,
                  max_shard_mb: int = 5120, best: bool = False,
                  dtype: str | None = None, adapter: bool = False) -> Path:
    """Export a megarank checkpoint or run directory (any layout) as an HF model directory.

    Streams: no model is built; each tensor is read from the checkpoint when its turn comes and
    the safetensors shards (at most ``max_shard_mb``) are written as they fill, so memory stays
    near one shard plus the largest tensor whatever the model's size. ``dtype``: ``bf16``,
    ``fp16`` or ``fp32`` (default: as stored). ``best``: a run directory's best checkpoint
    (``trainer.keep_best``) instead of its latest. In one process, or under torchrun on every
    rank (e.g. a training job's), each rank converting and writing its share of the tensors.

    A LoRA checkpoint is exported merged (``W + (alpha / r) * B A``, with its base read from
    where training read it), or with ``adapter`` as a PEFT adapter directory for that base.
    """

    from megarank.bundle import peft_enabled, saved_contract
    from megarank.checkpoint.export import export_hf
    from megarank.checkpoint.sharded import resolve_checkpoint
    from megarank.checkpoint.stream import CheckpointTensors
    from megarank.parallel.megatron import DTYPES
    from megarank.parallel.runtime import cpu_process_group

    if dtype is not None and dtype not in DTYPES:
        raise ArgumentError("{0} ({value!r}) must be one of {choices}", "dtype", value=dtype,
                            choices=", ".join(DTYPES))
    path = resolve_checkpoint(checkpoint, "best" if best else "latest")
    cfg, tokenizer, contract = saved_contract(path)
    ids = (contract.yes_token_id, contract.no_token_id) if contract.head == "yes_no" else None
    tensors: Any = CheckpointTensors(path)
    lora = peft_enabled(cfg)
    if adapter and not lora:
        raise ArgumentError("{path}: {0} needs a LoRA or DoRA checkpoint (peft.method lora or "
                            "dora), this one trained every weight", "adapter", path=path)
    if adapter:
        from megarank.checkpoint.adapters import export_adapter

        return export_adapter(tensors, cfg, out, tokenizer, contract,
                              dtype=DTYPES[dtype] if dtype else None)
    if lora:
        from megarank.checkpoint.adapters import MergedTensors

        tensors = MergedTensors(tensors, cfg)
    with cpu_process_group():  # under torchrun: the ranks share the export (CPU work, gloo)
        return export_hf(tensors, cfg, out, tokenizer, contract,
                         as_classifier=as_classifier, answer_ids=ids,
                         max_shard_bytes=max_shard_mb * 1024**2,
                         dtype=DTYPES[dtype] if dtype else None)


def evaluate_model(model: str | Path, collection: str | Path | RerankTask, *,
                   run: str | Path | None = None, split: str | None = None, top_k: int = 100,
                   depth: int | None = None, out_dir: str | Path | None = None,
                   batch_size: int = 64, overrides: Sequence[str] = (),
                   verbose: bool = False, teacher: str | Path | None = None) -> dict[str, Any]:
    """Rerank a first-stage run's top ``top_k`` for a collection's judged queries and measure it
    against the first stage (ir-measures, cross-checked by megarank's metrics).

    ``collection``: a BEIR folder, or a task ``megarank.eval.rerank.read_rerank_task`` already read and
    checked (then ``run``, ``split``, ``top_k`` and ``depth`` are the task's). Every input is
    checked before the model is built. Rank 0 writes ``out_dir`` (run.megarank.trec,
    metrics.json) and with ``verbose`` prints the table. Returns the metrics.json record.

    ``teacher``: a sentence-transformers model directory whose cosine similarity ranks the same
    candidates as a third row (and run.teacher.trec), scored on rank 0 before the model is built.
    """
    from megarank.eval.rerank import RerankTask, read_rerank_task

    task = collection if isinstance(collection, RerankTask) else read_rerank_task(
        collection, run, split, top_k, depth)
    return evaluate_tasks(model, [task], [out_dir], batch_size=batch_size, overrides=overrides,
                          verbose=verbose, teacher=teacher)[0]


def evaluate_tasks(model: str | Path, tasks: Sequence[RerankTask],
                   out_dirs: Sequence[str | Path | None], *, batch_size: int = 64,
                   overrides: Sequence[str] = (), verbose: bool = False,
                   teacher: str | Path | None = None) -> list[dict[str, Any]]:
    """:func:`evaluate_model` of several tasks (collections, splits; see :func:`rerank_task`)
    with the model built once: each task's record, as one call per task would give it, and
    its ``out_dirs`` entry written. Loading a large model once for a suite of collections is
    the point; with ``verbose`` each table is printed under its collection and split."""
    from megarank.bundle import open_bundle
    from megarank.eval.report import (
        check_teacher,
        format_table,
        summarise,
        teacher_runs,
        write_report,
    )
    from megarank.eval.rerank import rerank
    from megarank.parallel.env import is_main_process
    from megarank.training.logs import logger, setup_logging

    if len(out_dirs) != len(tasks):
        raise ArgumentError("{0} ({value}) must hold one entry per task ({n})", "out_dirs",
                            value=len(out_dirs), n=len(tasks))
    teacher_ranked: list = [None] * len(tasks)
    if teacher is not None:
        check_teacher(teacher)
        if is_main_process():  # the row is rank 0's to print and write
            teacher_ranked = teacher_runs(list(tasks), teacher, batch_size, progress=verbose)
    results = []
    with open_bundle(model, overrides) as bundle:
        runtime = bundle.runtime
        setup_logging(runtime)
        for task, out_dir, taught in zip(tasks, out_dirs, teacher_ranked, strict=True):
            where = (f"{task.collection.root} ({task.split or 'all judged queries'}): "
                     if len(tasks) > 1 else "")
            if task.skipped_unjudged:
                logger.info(f"{where}skipped {len(task.skipped_unjudged)} {task.split} queries "
                            "without judgements")
            if task.empty:
                logger.info(f"{where}{len(task.empty)} judged queries have no candidate in "
                            f"{task.run_path}: they count as 0 in both rows")
            reranked = rerank(task, bundle.model, runtime, bundle.collator, batch_size,
                              passages=bundle.cfg.data.passages)
            result = summarise(task, reranked, str(model), taught,
                               None if teacher is None else str(teacher))
            if runtime.is_main:
                if result["cross_check_max_abs_diff"] > 1e-9:
                    logger.warning(f"{where}ir-measures and megarank's metrics disagree by "
                                   f"{result['cross_check_max_abs_diff']:.3g}")
                if out_dir is not None:
                    write_report(out_dir, reranked, task.qrels, result, taught)
                if verbose:
                    if where:
                        print(f"\n{where.rstrip(': ')}", flush=True)
                    print(format_table(result), flush=True)
            results.append(result)
    return results


def prepare_data(inputs: Sequence[str | Path], out: str | Path, overrides: Sequence[str] = (),
                 progress: bool = True) -> PrepareStats:
    """Tokenize triplet JSONL ``inputs`` once, with the tokenizer and truncation that the config
    ``overrides`` (``model=...``, ``pair.max_length=...``) give, into the prepared dataset
    directory ``out`` (written atomically), which training takes as ``data.train_path=OUT``.
    No model and no process group is built. See ``megarank.data.prepared``."""
    from megarank.bundle import build_collator, build_tokenizer, checked_contract
    from megarank.checkpoint.hf import apply_hf_config
    from megarank.config import validate
    from megarank.data.prepared import write_prepared

    cfg = compose_config(overrides)
    apply_hf_config(cfg)
    validate(cfg, 1)
    tokenizer = build_tokenizer(cfg)
    collator = build_collator(cfg, checked_contract(cfg, tokenizer, None), tokenizer)
    return write_prepared(inputs, out, collator, progress)


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path,
                 names: Sequence[str] | None = None, *, verbose: bool = False) -> dict[str, Path]:
    """Several runs' training loss and evaluation metrics over steps, side by side: writes
    ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into ``out_dir`` (see
    ``megarank.eval.run_curves``); with ``verbose`` prints the per-run summary. Returns the paths."""
    from megarank.eval.run_curves import load_runs, summary_markdown, write_comparison

    runs = load_runs(run_dirs, names)
    paths = write_comparison(runs, out_dir)
    if verbose:
        print(summary_markdown(runs), flush=True)
    return paths


def mine_triplets(collection: str | Path, out: str | Path, *, split: str | None = None,
                  retriever: str = "bm25", model: str | Path | None = None, depth: int = 100,
                  skip_top: int = 0, negatives: int = 15, margin: float | None = None,
                  seed: int = 0, batch_size: int = 64, overrides: Sequence[str] = (),
                  progress: bool = True, pseudo_queries: int = 0,
                  fuse_bm25: float = 0.0, embed_max_length: int | None = None) -> MineStats:
    """Write FlagEmbedding triplets with hard negatives for a collection's judged queries.

    ``retriever``: ``bm25`` (candidates as they are), ``model`` (re-sorted by a megarank
    checkpoint or export at ``model``, whose scores become teacher scores) or ``dense`` (by a
    sentence-transformers embedder's cosine). ``pseudo_queries``: also that many documents'
    first sentences as queries, labelled by that teacher; ``fuse_bm25``: the weight of BM25 in a
    fused teacher; ``embed_max_length``: tokens of each text the ``dense`` embedder reads
    (None: the embedder's own limit). See ``megarank.data.mining`` for the rules.
    """
    from megarank.data.mining import RETRIEVERS, dense_rescorer, mine
    from megarank.parallel.runtime import cpu_process_group

    if retriever not in RETRIEVERS:
        raise ArgumentError("{0} ({value!r}) must be one of {choices}", "retriever",
                            value=retriever, choices=", ".join(RETRIEVERS))
    if retriever != "bm25" and model is None:
        raise ArgumentError("{0} {value} needs {1} (a reranker or embedder directory)",
                            "retriever", "model", value=retriever)
    if embed_max_length is not None and (retriever != "dense" or embed_max_length < 1):
        raise ArgumentError("{0} ({value!r}) must be a positive token count, with {1} dense",
                            "embed_max_length", "retriever", value=embed_max_length)
    if retriever == "dense":  # under torchrun: BM25 on rank 0, each text embedded once
        with cpu_process_group():
            rescorer = dense_rescorer(model, batch_size, progress, embed_max_length)
            return mine(collection, out, split, rescorer,
                        depth, skip_top, negatives, margin, seed, progress, pseudo_queries,
                        fuse_bm25)
    if retriever == "bm25":
        return mine(collection, out, split, None, depth, skip_top, negatives, margin, seed,
                    progress, pseudo_queries, fuse_bm25)
    scorer: Scorer | None = None

    def rescore(coll: Any, keys: list[tuple[str, str]]) -> list[float]:
        nonlocal scorer
        # Built only once BM25 is done, so a bad collection fails before any model is built.
        scorer = load_scorer(model, overrides, batch_size=batch_size)
        return scorer.score([(coll.queries[q], coll.corpus[d]) for q, d in keys], progress)

    try:
        return mine(collection, out, split, rescore, depth, skip_top, negatives, margin, seed,
                    progress, pseudo_queries, fuse_bm25)
    finally:
        if scorer is not None:
            scorer.close()


def rerank_task(collection: str | Path, run: str | Path | None = None, split: str | None = None,
                top_k: int = 100, depth: int | None = None) -> RerankTask:
    """The judged queries of ``collection`` (a BEIR-layout folder) with the top ``top_k`` (to
    ``depth``) candidates of its first-stage ``run`` (default ``run.bm25.trec``), as
    :func:`evaluate_model` reranks them; bad files are refused naming the file and line."""
    from megarank.eval.rerank import read_rerank_task

    return read_rerank_task(collection, run, split, top_k, depth)


def check_teacher(embedder: str | Path) -> None:
    """Refuse, before any model is built, an embedder directory sentence-transformers cannot
    load as the teacher row of :func:`evaluate_model`."""
    from megarank.eval.report import check_teacher as check

    check(embedder)


def measure_memory(cfg: DictConfig, plan: MemoryPlan) -> tuple[str, list[dict[str, Any]]]:
    """Build ``cfg``'s model on ``plan.device`` (on every rank), run one training step, and
    return the table of the measured memory beside the planned (``megarank plan --measure``)
    and each rank's measurement as a record (with its pipeline ``stage``), in rank order."""
    import dataclasses

    from megarank.training.memory import format_comparison, measure

    measured = measure(cfg, device=plan.device)
    return (format_comparison(plan, measured),
            [{**dataclasses.asdict(m), "stage": s} for m, s in measured])


def open_engine(model: str | Path, overrides: Sequence[str] = (), *, device: str | None = None,
                threads: int | None = None, limits: ServeLimits | None = None,
                max_length: int | None = None, relevance: str = "raw",
                name: str | None = None) -> RerankEngine:
    """A serving engine over ``model`` in this process (torch given ``threads`` CPU threads,
    default the cores this process may use), accepting and batching requests within ``limits``
    (:class:`megarank.serving.engine.ServeLimits`, here ``megarank.api.ServeLimits``; default
    its defaults); ``max_length``, ``relevance`` and ``name`` are the engine's
    (:class:`megarank.serving.engine.RerankEngine`)."""
    import torch

    from megarank.serving.engine import RerankEngine, ServeLimits, default_threads

    torch.set_num_threads(threads or default_threads())
    return RerankEngine.load(model, overrides, device=device, limits=limits or ServeLimits(),
                             max_length=max_length, relevance=relevance, name=name)


def serve_app(engine: RerankEngine, api_key: str | None = None) -> Any:
    """The FastAPI application over ``engine`` (``megarank.serving.app.create_app``)."""
    from megarank.serving.app import create_app

    return create_app(engine, api_key=api_key)
