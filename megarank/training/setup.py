"""What a training run needs beyond its model stage (megarank/bundle.py builds that): the run
directory and this data-parallel rank's stream of micro-batches."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig

from megarank.config.validate import ConfigError
from megarank.data.budget import split_by_tokens
from megarank.data.collate import PairCollator
from megarank.data.groups import GroupDataset
from megarank.data.prefetch import Prefetcher
from megarank.data.prepared import (
    TokenGroupDataset,
    collate_token_groups,
    is_prepared,
    load_jsonl,
    open_prepared,
)
from megarank.data.sampler import GroupSampler
from megarank.data.triplets import read_triplets
from megarank.parallel.runtime import Runtime
from megarank.training.losses import needs_teacher as _needs_teacher


def resolve_output_dir(cfg: DictConfig, runtime: Runtime) -> Path:
    """trainer.output_dir, or a fresh dated directory chosen on rank 0 and shared with all ranks."""
    name = cfg.trainer.output_dir
    if name is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"runs/{stamp}-{cfg.model.name}-{cfg.task.loss}"
    holder = [str(Path(name).resolve())]
    dist.broadcast_object_list(holder, src=0)
    out = Path(holder[0])
    if runtime.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def build_data(cfg: DictConfig, runtime: Runtime, collator: PairCollator, consumed_samples: int):
    """The training groups and an endless iterator of this DP rank's steps, each a list of its
    micro-batches (a `Prefetcher`: ``data.prefetch_steps`` steps are made ahead on a background
    thread). Micro-batches hold trainer.micro_batch_size groups, or are cut by tokens
    (``data.tokens_per_micro_batch``, megarank.data.budget), their number then varying.

    ``data.train_path`` is a prepared dataset directory (``megarank prepare``; memory-mapped) or
    a triplet JSONL, which is prepared in memory the same way, so both give the same batches.
    Only the chat layout (pair=qwen3_reranker), which tokenizes each pair whole, takes JSONL
    records as text.
    """
    dataset, collate = _training_groups(cfg, collator)
    trainer, budget = cfg.trainer, cfg.data.tokens_per_micro_batch
    per_rank = trainer.global_batch_size // runtime.dp_size
    # With a token budget one draw of the sampler is the rank's whole step, cut afterwards.
    sampler = GroupSampler(
        len(dataset), per_rank if budget else trainer.micro_batch_size, runtime.dp_rank, runtime.dp_size,
        cfg.trainer.seed, consumed_samples=consumed_samples,
    )
    num_microbatches = trainer.global_batch_size // (trainer.micro_batch_size * runtime.dp_size)
    steps = _steps(sampler, collate, collator, budget, num_microbatches,
                   pin=runtime.device.type == "cuda")
    return dataset, Prefetcher(steps, cfg.data.prefetch_steps)


def _training_groups(cfg: DictConfig, collator: PairCollator) -> tuple[Any, Callable]:
    """The training groups and the function that collates a draw of them into a batch: token
    groups (a prepared dataset, or JSONL prepared in memory) or, for the chat layout, text."""
    path = Path(cfg.data.train_path)
    group_size, seed = cfg.task.group_size, cfg.trainer.seed
    needs_teacher = _needs_teacher(cfg.task.loss, cfg.task.target, cfg.task.distill_weight)
    if is_prepared(path) or collator.pretokenizable:
        data = open_prepared(path) if is_prepared(path) else load_jsonl(
            path, collator, cfg.data.max_records)
        data.check_settings(collator)
        dataset = TokenGroupDataset(data, group_size, seed, cfg.data.max_records)
        _refuse_missing_teacher(cfg, dataset.first_without_teacher() if needs_teacher else None)

        def collate_tokens(items):
            return collate_token_groups(collator, data, (dataset[i, e] for i, e in items))

        return dataset, collate_tokens
    records = read_triplets(path, cfg.data.max_records)
    _refuse_missing_teacher(cfg, next((r.source for r in records if r.pos_scores is None
                                       or (r.neg and r.neg_scores is None)), None)
                            if needs_teacher else None)
    groups = GroupDataset(records, group_size, seed)
    # The worker thread tokenizes with its own tokenizer: the loop's evaluation uses this
    # one meanwhile, and a call sets the tokenizer's truncation state.
    text_collator = copy.deepcopy(collator) if cfg.data.prefetch_steps else collator

    def collate_text(items):
        return text_collator([groups[i, e] for i, e in items])

    return groups, collate_text


def _refuse_missing_teacher(cfg: DictConfig, missing: str | None) -> None:
    """A distillation loss needs every record's teacher scores: name the first without."""
    if missing is not None:
        raise ConfigError(
            f"{missing}: record has no teacher scores (pos_scores/neg_scores), which "
            f"task.loss={cfg.task.loss} with task.distill_weight={cfg.task.distill_weight} "
            "needs; mine them with `megarank mine --retriever dense|model`")


def _steps(sampler: GroupSampler, collate: Callable, collator: PairCollator,
           budget: int | None, num_microbatches: int, pin: bool) -> Iterator[list]:
    """This rank's steps, each a list of its micro-batches in the model's layout. Made on the
    prefetch thread: cutting, packing and pinning stay off the step's critical path, and
    pinned batches copy to the GPU asynchronously."""
    draws = iter(sampler)
    while True:
        if budget is None:
            parts = [collate(next(draws)) for _ in range(num_microbatches)]
        else:
            parts = split_by_tokens(collate(next(draws)), budget,
                                    collator.pad_to_multiple_of, collator.packed_multiple)
        batches = [collator.model_layout(b) for b in parts]
        yield [b.pin_memory() for b in batches] if pin else batches
