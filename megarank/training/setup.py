"""Building what a run needs, on this rank: model stage (+ HF or checkpoint weights), optimizer and
scheduler, tokenizer and pair collation, the data stream, the run directory."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from omegaconf import DictConfig
from transformers import AutoTokenizer

from megarank.checkpoint.hf import load_hf_weights
from megarank.config.validate import ConfigError
from megarank.data.collate import PairCollator
from megarank.data.groups import GroupDataset
from megarank.data.sampler import GroupSampler
from megarank.data.triplets import read_triplets
from megarank.models.build import (
    DTYPES,
    build_cross_encoder,
    padded_vocab_size,
    sync_tied_output_layer,
    transformer_config,
)
from megarank.models.specs import check_kernel_support, select_kernels
from megarank.parallel.runtime import Runtime
from megarank.training.logs import logger


def resolve_output_dir(cfg: DictConfig, rt: Runtime) -> Path:
    """trainer.output_dir, or a fresh dated directory chosen on rank 0 and shared with all ranks."""
    name = cfg.trainer.output_dir
    if name is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"runs/{stamp}-{cfg.model.name}-{cfg.task.loss}"
    holder = [str(Path(name).resolve())]
    dist.broadcast_object_list(holder, src=0)
    out = Path(holder[0])
    if rt.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def build_model(cfg: DictConfig, rt: Runtime, tokenizer: Any, load_weights: bool = True,
                answer_ids: tuple[int, int] | None = None) -> tuple[DistributedDataParallel, Any]:
    """This rank's cross-encoder stage, on its device, wrapped in megatron DDP.

    With ``model.hf_path`` (and ``load_weights``) the stage's weights are read from the HF model,
    sharded to this rank's part of the layout. The yes/no head's token ids come from the
    tokenizer unless given as ``answer_ids``.
    """
    kernels = select_kernels(cfg.trainer.kernels, rt.device)
    check_kernel_support(cfg.parallel.sequence_parallel, kernels)
    tconfig = transformer_config(cfg, rt.device, kernels.name)
    ids = answer_ids
    if ids is None and cfg.task.head == "yes_no":
        ids = answer_token_ids(tokenizer, cfg.task)
    model = build_cross_encoder(cfg, tconfig, kernels, rt.is_first_stage, rt.is_last_stage, ids)
    if load_weights and cfg.model.hf_path:
        missing = load_hf_weights(
            model, cfg.model.hf_path, cfg, rt.tp_rank, rt.tp_size, rt.pp_rank, rt.pp_size,
            padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by),
        )
        init_missing(model, missing, cfg.model.init_method_std)
        if missing and rt.tp_rank == 0 and rt.dp_rank == 0:
            logger.warning(f"{cfg.model.hf_path} holds no weights for {', '.join(missing)}: "
                           "they start from a fresh initialisation")
    sync_tied_output_layer(model)
    model.to(rt.device)
    if cfg.trainer.precision != "fp32":
        # bf16/fp16 weights and activations; the optimizer keeps fp32 main weights.
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.trainer.precision != "fp32",
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    # The schedules reduce grads across DP (and embedding groups) through this hook, and skip the
    # DP all-reduce on all but the last micro-batch through no_sync.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = ddp.no_sync
    return ddp, kernels


def init_missing(model: torch.nn.Module, names: list[str], std: float) -> None:
    """Initialise parameters an HF import did not fill, as HF does: N(0, std) weights, zero
    biases. Seeded the same on every rank, so TP/DP replicas of a head agree."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(names):
            p = params[name]
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def build_tokenizer(cfg: DictConfig) -> Any:
    """The model's HF tokenizer; its vocabulary must fit the model's."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(
            f"model.tokenizer ({cfg.model.tokenizer}) has {len(tokenizer)} tokens but "
            f"model.vocab_size is {cfg.model.vocab_size}"
        )
    return tokenizer


def answer_token_ids(tokenizer: Any, task: Any) -> tuple[int, int]:
    """The single-token ids of task.yes_token and task.no_token (yes/no head)."""
    ids = []
    for field_name in ("yes_token", "no_token"):
        text = task[field_name]
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"task.{field_name} ({text!r}) must be one token of the tokenizer, "
                             f"got {len(toks)}: {toks}")
        ids.append(toks[0])
    return ids[0], ids[1]


def build_collator(cfg: DictConfig, tokenizer: Any) -> PairCollator:
    """Pair tokenization as the model family and data config ask."""
    return PairCollator(
        tokenizer, kind="encoder" if cfg.model.family == "bert" else "decoder",
        max_length=cfg.data.max_length, max_query_length=cfg.data.max_query_length,
        template=cfg.model.prompt_template if cfg.model.family == "gpt" else None,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )


def build_optimizer(cfg: DictConfig, model: DistributedDataParallel) -> tuple[Any, Any]:
    """megatron's AdamW (weight decay off for biases and norms) and its LR scheduler."""
    o, tr = cfg.optim, cfg.trainer
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=tr.precision == "bf16", fp16=tr.precision == "fp16",
        params_dtype=DTYPES[tr.precision],
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        loss_scale=o.loss_scale, initial_loss_scale=o.initial_loss_scale,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    use_fused_torch_adamw(optimizer)
    # fp16: the schedules multiply the loss by the current loss scale before backward.
    model.config.grad_scale_func = optimizer.scale_loss if tr.precision == "fp16" else None
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=tr.max_steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=tr.max_steps, wd_incr_style="constant",
    )
    return optimizer, scheduler


def use_fused_torch_adamw(optimizer: Any) -> bool:
    """Without TE or apex, megatron steps with torch's AdamW in its default (foreach) form; on
    CUDA its single fused kernel does the same update faster. Returns whether it was switched on.
    """
    switched = False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW | torch.optim.Adam):
            continue  # TE / apex FusedAdam
        params = [p for g in inner.param_groups for p in g["params"]]
        if params and all(p.is_cuda and p.dtype == torch.float32 for p in params):
            for g in inner.param_groups:
                g["fused"], g["foreach"] = True, False
            switched = True
    return switched


def build_data(cfg: DictConfig, rt: Runtime, collator: PairCollator, consumed_samples: int):
    """The training groups and an endless iterator of this DP rank's micro-batches."""
    records = read_triplets(cfg.data.train_path, cfg.data.max_records)
    if cfg.task.loss == "distill" or cfg.task.distill_weight > 0:
        for r in records:
            if r.pos_scores is None or (r.neg and r.neg_scores is None):
                raise ConfigError(
                    f"{r.source}: record has no teacher scores (pos_scores/neg_scores), which "
                    f"task.loss={cfg.task.loss} with task.distill_weight={cfg.task.distill_weight} "
                    "needs; mine them with `megarank mine --retriever dense|model`")
    dataset = GroupDataset(records, cfg.task.group_size, cfg.trainer.seed)
    sampler = GroupSampler(
        len(dataset), cfg.trainer.micro_batch_size, rt.dp_rank, rt.dp_size, cfg.trainer.seed,
        consumed_samples=consumed_samples,
    )

    def micro_batches():
        for items in sampler:
            yield collator([dataset[i, e] for i, e in items])

    return dataset, micro_batches()
