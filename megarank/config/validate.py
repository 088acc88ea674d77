"""Checks on a composed config, and the sizes derived from it, computed in one place.

Every check runs before any process group or model is built, and every message names the config
fields involved, e.g. ``model.num_attention_heads (12) must be divisible by
parallel.tensor_model_parallel_size (5)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

FAMILIES = ("gpt", "bert", "deberta")
ENCODER_FAMILIES = ("bert", "deberta")
"""Bidirectional encoders: [CLS] query [SEP] document [SEP], pooled at [CLS]."""
LOSSES = ("listwise", "pairwise", "pointwise", "distill", "margin_mse", "ranknet", "lambdarank",
          "listnet")
"""megarank.training.losses.LOSSES (the config layer imports nothing above it)."""
DISTILL_TERMS = ("kl", "margin_mse", "ranknet", "lambdarank", "listnet")
DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """An invalid configuration; the message names the fields."""


EVAL_METRICS = ("MRR@10", "NDCG@10", "Recall@10")
"""What training's held-out evaluation measures (megarank.eval.rerank.HeldOutEval)."""


@dataclass(frozen=True)
class Derived:
    """Sizes computed from the config and the world size."""

    world_size: int
    tp: int
    pp: int
    dp: int
    num_microbatches: int
    """Micro-batches per optimizer step on each data-parallel rank; with
    data.tokens_per_micro_batch the most a step can have (one a group), the count varying."""
    pairs_per_micro_batch: int
    """Sequences in one forward pass: micro_batch_size * group_size (with
    data.tokens_per_micro_batch: one group's, the least)."""


def padded_vocab_size(model: Any) -> int:
    """Rows of the embedding table (and of a vocab-parallel output layer): ``model.vocab_size``
    rounded up to a multiple of ``model.make_vocab_size_divisible_by``, so every TP shard has
    equal, aligned rows. The one place megarank pads the vocabulary.

    Independent of the TP size (:func:`validate` requires make_vocab_size_divisible_by to be
    divisible by parallel.tensor_model_parallel_size), so a checkpoint's shapes are the same in
    every layout.
    """
    vocab, div = int(model.vocab_size), int(model.make_vocab_size_divisible_by)
    if vocab < 1 or div < 1:
        raise ConfigError(f"model.vocab_size ({vocab}) and model.make_vocab_size_divisible_by "
                          f"({div}) must be positive")
    return -(-vocab // div) * div


def _div(errors: list[str], a_name: str, a: int, b_name: str, b: int) -> None:
    if b <= 0:
        errors.append(f"{b_name} ({b}) must be positive")
    elif a % b != 0:
        errors.append(f"{a_name} ({a}) must be divisible by {b_name} ({b})")


def _choice(errors: list[str], name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{name} ({value!r}) must be one of {', '.join(allowed)}")


def chat_template_problem(template: str) -> str | None:
    """What is wrong with a chat prompt's pair template, or None: it must hold {query} and
    {document} once each, {instruction} at most once, and no other placeholder (it is filled
    with str.format)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"not a format string ({e}): {template!r}"
    for name in ("query", "document"):
        if fields.count(name) != 1:
            return f"template must contain {{{name}}} exactly once: {template!r}"
    if [f for f in fields if f not in ("query", "document", "instruction")] or fields.count(
            "instruction") > 1:
        return (f"template may hold only {{instruction}} (at most once), {{query}} and "
                f"{{document}}, got {fields}: {template!r}")
    return None


def check_mandatory(cfg: Any) -> None:
    """Fields a preset leaves to the user (``???``), named before anything reads them (what a
    run needs; ``validate`` alone also serves planning, which needs no data)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    if cfg.model.name == "hf" and not cfg.model.hf_path:
        raise ConfigError("invalid configuration:\n  - model=hf needs model.hf_path (a Hugging "
                          "Face model directory; its config.json gives the architecture)")
    missing = [f"{group}.{key}" for group in cfg for key in cfg[group]
               if isinstance(cfg[group], DictConfig) and OmegaConf.is_missing(cfg[group], key)]
    if missing:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(
            f"{name} must be set (e.g. {name}=...)" for name in missing))


PEFT_METHODS = ("none", "lora", "qlora", "dora")
PEFT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _check_peft(errors: list[str], cfg: Any) -> None:
    """The peft group: rank, alpha, dropout, targets, and what adapters cannot run with."""
    peft = cfg.get("peft")
    if peft is None:
        return
    _choice(errors, "peft.method", peft.method, PEFT_METHODS)
    if peft.method == "none":
        return
    if peft.rank < 1:
        errors.append(f"peft.rank ({peft.rank}) must be >= 1")
    if not peft.alpha > 0:
        errors.append(f"peft.alpha ({peft.alpha}) must be positive")
    if not 0 <= peft.dropout < 1:
        errors.append(f"peft.dropout ({peft.dropout}) must be in [0, 1)")
    targets = list(peft.targets)
    if not targets:
        errors.append(f"peft.targets is empty: name some of {', '.join(PEFT_TARGETS)}")
    for t in targets:
        if t not in PEFT_TARGETS:
            errors.append(f"peft.targets: {t!r} is not a megatron linear of the model; choose "
                          f"from {', '.join(PEFT_TARGETS)}")
    if len(set(targets)) != len(targets):
        errors.append(f"peft.targets ({targets}) names a linear twice")
    if cfg.parallel.sequence_parallel:
        errors.append("peft.method lora/qlora/dora with parallel.sequence_parallel is not supported: "
                      "the adapters read the full sequence")
    if cfg.trainer.kernels == "te":
        errors.append("peft.method lora/qlora/dora runs on megatron's local layers: Transformer "
                      "Engine fuses the norm into the linear and hides its input from the "
                      "adapter (set trainer.kernels=auto or local)")
    if peft.method == "qlora" and not cfg.model.hf_path:
        errors.append("peft.method qlora quantizes the base as it is read from a Hugging Face "
                      "model: set model.hf_path")
    if peft.method == "qlora" and cfg.trainer.precision == "fp16":
        errors.append("peft.method qlora computes in bf16 or fp32 (trainer.precision), not fp16")


def _check_deberta(errors: list[str], cfg: Any) -> None:
    """What model.family deberta needs and what it cannot run with."""
    m = cfg.model
    if m.position_embedding_type != "relative":
        errors.append(f"model.position_embedding_type ({m.position_embedding_type!r}) must be "
                      "'relative' for model.family deberta")
    if m.encoder_head != "deberta":
        errors.append(f"model.encoder_head ({m.encoder_head!r}) must be 'deberta' for "
                      "model.family deberta (ContextPooler)")
    bad = [t for t in m.pos_att_type if t not in ("c2p", "p2c")]
    if bad or len(set(m.pos_att_type)) != len(m.pos_att_type):
        errors.append(f"model.pos_att_type ({list(m.pos_att_type)}) must be a subset of "
                      "[c2p, p2c]")
    _choice(errors, "model.norm_rel_ebd", m.norm_rel_ebd, ("layer_norm", "none"))
    if cfg.data.packing:
        # A packed row would need each pair's relative positions (an [s, s] index per segment)
        # in the position terms; the padded path computes one index per micro-batch.
        errors.append("data.packing is not supported for model.family deberta (its relative "
                      "positions are per padded row); set data.packing=false")
    if cfg.parallel.sequence_parallel:
        errors.append("parallel.sequence_parallel is not supported for model.family deberta "
                      "(every rank projects the whole relative-position table)")


def _check_choices(errors: list[str], cfg: Any) -> None:
    """Fields that take one of a few values."""
    m, t, trainer, o = cfg.model, cfg.task, cfg.trainer, cfg.optim
    _choice(errors, "model.family", m.family, FAMILIES)
    _choice(errors, "task.loss", t.loss, LOSSES)
    _choice(errors, "pair.head", cfg.pair.head, ("classifier", "yes_no"))
    if cfg.pair.head == "yes_no" and m.family != "gpt":
        errors.append(f"pair.head yes_no needs a decoder (model.family gpt), not {m.family!r}")
    _choice(errors, "optim.decay_style", o.decay_style, DECAY_STYLES)
    _choice(errors, "trainer.precision", trainer.precision, PRECISIONS)
    _choice(errors, "trainer.device", trainer.device, DEVICES)
    _choice(errors, "trainer.kernels", trainer.kernels, ("auto", "te", "local"))
    _choice(errors, "trainer.recompute", trainer.recompute, ("none", "selective", "full"))
    _choice(errors, "model.normalization", m.normalization, ("RMSNorm", "LayerNorm"))
    _choice(errors, "model.activation", m.activation, ("silu", "gelu"))
    _choice(
        errors, "model.position_embedding_type", m.position_embedding_type,
        ("rope", "learned_absolute", "relative"),
    )


def _check_model_shape(errors: list[str], cfg: Any) -> None:
    """The model's shape against the parallel layout, and what a family allows."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _div(errors, "model.num_attention_heads", m.num_attention_heads,
         "parallel.tensor_model_parallel_size", tp)
    groups = m.num_query_groups or m.num_attention_heads
    _div(errors, "model.num_attention_heads", m.num_attention_heads, "model.num_query_groups",
         groups)
    _div(errors, "model.num_query_groups", groups, "parallel.tensor_model_parallel_size", tp)
    if m.make_vocab_size_divisible_by % tp != 0:
        # Vocabulary padding must not depend on tp, so checkpoints move between layouts.
        errors.append(
            f"model.make_vocab_size_divisible_by ({m.make_vocab_size_divisible_by}) must be "
            f"divisible by parallel.tensor_model_parallel_size ({tp})"
        )
    _div(errors, "model.num_layers", m.num_layers, "parallel.pipeline_model_parallel_size", pp)
    if m.head_dim is None:
        _div(errors, "model.hidden_size", m.hidden_size, "model.num_attention_heads",
             m.num_attention_heads)
    _div(errors, "model.ffn_hidden_size", m.ffn_hidden_size,
         "parallel.tensor_model_parallel_size", tp)
    if m.family == "bert" and m.position_embedding_type != "learned_absolute":
        errors.append("model.position_embedding_type must be 'learned_absolute' for model.family bert")
    if m.family == "deberta":
        _check_deberta(errors, cfg)
    else:
        _choice(errors, "model.encoder_head", m.encoder_head, ("bert", "roberta"))
    if m.rope_scaling is not None:
        _choice(errors, "model.rope_scaling", m.rope_scaling, ("llama3",))
        if m.family != "gpt":
            errors.append(f"model.rope_scaling ({m.rope_scaling!r}) needs model.family gpt")
        if not m.rope_high_freq_factor > m.rope_low_freq_factor > 0:
            errors.append(f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) must be > "
                          f"model.rope_low_freq_factor ({m.rope_low_freq_factor}) > 0")
    if m.position_offset < 0 or (m.position_offset and m.family != "bert"):
        errors.append(f"model.position_offset ({m.position_offset}) must be >= 0, and 0 unless "
                      "model.family is bert")
    if m.sliding_window is not None and cfg.pair.max_length > m.sliding_window:
        errors.append(f"pair.max_length ({cfg.pair.max_length}) must be <= model.sliding_window "
                      f"({m.sliding_window}): megarank attends over the whole sequence")


def _batch_layout(errors: list[str], cfg: Any, world_size: int) -> tuple[int, int, int | None]:
    """The data-parallel size and micro-batches per step this world gives (0 where it cannot),
    and data.tokens_per_micro_batch."""
    p, t, trainer = cfg.parallel, cfg.task, cfg.trainer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = 0
    if tp <= 0 or pp <= 0:
        errors.append(
            f"parallel.tensor_model_parallel_size ({tp}) and "
            f"parallel.pipeline_model_parallel_size ({pp}) must be positive"
        )
    elif world_size % (tp * pp) != 0:
        errors.append(
            f"world size ({world_size}) must be divisible by parallel.tensor_model_parallel_size "
            f"({tp}) * parallel.pipeline_model_parallel_size ({pp})"
        )
    else:
        dp = world_size // (tp * pp)
    num_micro = 0
    budget = cfg.data.tokens_per_micro_batch
    if budget is not None:
        # Micro-batches are cut by tokens (megarank.data.budget): trainer.micro_batch_size is
        # not read; each rank takes global_batch_size / dp groups a step, in as many
        # micro-batches as they need (at most one a group).
        if dp and (trainer.global_batch_size < dp or trainer.global_batch_size % dp):
            errors.append(
                f"trainer.global_batch_size ({trainer.global_batch_size}) must be a positive multiple "
                f"of the data-parallel size ({dp}) with data.tokens_per_micro_batch")
        elif dp:
            num_micro = trainer.global_batch_size // dp
        rows = t.group_size * (cfg.data.train_passages if cfg.data.passages == "max" else 1)
        if cfg.data.packing:
            need = -(-rows * cfg.pair.max_length // cfg.data.packed_multiple) * \
                cfg.data.packed_multiple
        else:
            need = rows * cfg.pair.max_length
        if budget < need:
            errors.append(
                f"data.tokens_per_micro_batch ({budget}) must hold one whole group at its "
                f"longest: {rows} rows x pair.max_length ({cfg.pair.max_length}) = {need}")
    elif trainer.micro_batch_size <= 0:
        errors.append(f"trainer.micro_batch_size ({trainer.micro_batch_size}) must be positive")
    elif dp:
        per_step = trainer.micro_batch_size * dp
        if trainer.global_batch_size % per_step != 0:
            errors.append(
                f"trainer.global_batch_size ({trainer.global_batch_size}) must be divisible by "
                f"trainer.micro_batch_size ({trainer.micro_batch_size}) * data-parallel size ({dp})"
            )
        else:
            num_micro = trainer.global_batch_size // per_step
            if num_micro == 0:
                errors.append(
                    f"trainer.global_batch_size ({trainer.global_batch_size}) must be at least "
                    f"trainer.micro_batch_size ({trainer.micro_batch_size}) * data-parallel size ({dp})"
                )

    return dp, num_micro, budget


def _check_data(errors: list[str], cfg: Any) -> None:
    """How training data is read."""
    _choice(errors, "data.passages", cfg.data.passages, ("first", "max"))
    if cfg.data.passage_stride is not None and cfg.data.passage_stride < 1:
        errors.append(f"data.passage_stride ({cfg.data.passage_stride}) must be >= 1")
    if cfg.data.train_passages < 1:
        errors.append(f"data.train_passages ({cfg.data.train_passages}) must be >= 1")
    if cfg.data.passages == "max" and cfg.pair.prefix is not None:
        errors.append("data.passages=max needs query and document tokenized apart; a chat "
                      "prompt (pair.prefix) tokenizes each pair whole")
    if cfg.data.prefetch_steps < 0:
        errors.append(f"data.prefetch_steps ({cfg.data.prefetch_steps}) must be >= 0")
    try:
        train_path = str(cfg.data.train_path)
    except Exception:  # missing: check_mandatory names it
        train_path = ""
    if train_path and os.path.isdir(train_path) and not os.path.isfile(
            os.path.join(train_path, "meta.json")):
        errors.append(f"data.train_path ({train_path}) is a directory but not a complete "
                      "prepared dataset (no meta.json); build one with `megarank prepare`")


def _check_task(errors: list[str], cfg: Any) -> None:
    """The loss and its weights."""
    t = cfg.task
    if t.loss != "pointwise" and t.group_size < 2:
        errors.append(f"task.group_size ({t.group_size}) must be >= 2 for task.loss {t.loss}")
    if t.group_size < 1:
        errors.append(f"task.group_size ({t.group_size}) must be >= 1")
    if t.temperature <= 0:
        errors.append(f"task.temperature ({t.temperature}) must be positive")
    if t.teacher_temperature <= 0:
        errors.append(f"task.teacher_temperature ({t.teacher_temperature}) must be positive")
    if t.distill_weight < 0:
        errors.append(f"task.distill_weight ({t.distill_weight}) must be >= 0")
    _choice(errors, "task.target", t.target, ("labels", "teacher"))
    _choice(errors, "task.distill_term", t.distill_term, DISTILL_TERMS)
    if t.hard_weight < 0:
        errors.append(f"task.hard_weight ({t.hard_weight}) must be >= 0")
    if t.hard_weight == 0 and t.distill_weight == 0:
        errors.append("task.hard_weight and task.distill_weight are both 0: nothing to train")


def _check_pair(errors: list[str], cfg: Any) -> None:
    """The pair format (a chat prompt)."""
    m = cfg.model
    pf = cfg.pair
    if pf.prefix is not None:
        if m.family != "gpt":
            errors.append(f"pair.prefix (a chat prompt) needs a decoder (model.family "
                          f"gpt), not {m.family!r}")
        problem = chat_template_problem(pf.template)
        if problem:
            errors.append(f"pair.template: {problem}")
        if "{instruction}" in pf.template and pf.instruction is None:
            errors.append("pair.template has {instruction}: pair.instruction must be set "
                          "(the default of records without one)")


def _check_features(errors: list[str], cfg: Any) -> None:
    """Features that need something else (sequence parallel, packing, lengths)."""
    m, p, trainer = cfg.model, cfg.parallel, cfg.trainer
    tp = p.tensor_model_parallel_size
    if p.sequence_parallel and tp < 2:
        errors.append("parallel.sequence_parallel requires parallel.tensor_model_parallel_size > 1")
    if p.sequence_parallel and tp > 0 and cfg.data.pad_to_multiple_of % tp != 0:
        # Sequence parallelism splits the sequence dimension over the TP ranks.
        errors.append(
            f"parallel.sequence_parallel needs data.pad_to_multiple_of "
            f"({cfg.data.pad_to_multiple_of}) divisible by parallel.tensor_model_parallel_size "
            f"({tp})"
        )
    if cfg.data.packed_multiple < 1:
        errors.append(f"data.packed_multiple ({cfg.data.packed_multiple}) must be >= 1")
    elif (cfg.data.packing and p.sequence_parallel and tp > 0
          and cfg.data.packed_multiple % tp != 0):
        errors.append(
            f"parallel.sequence_parallel with data.packing needs data.packed_multiple "
            f"({cfg.data.packed_multiple}) divisible by parallel.tensor_model_parallel_size "
            f"({tp})")
    if p.use_distributed_optimizer and trainer.precision == "fp16":
        errors.append("parallel.use_distributed_optimizer with trainer.precision fp16 is not "
                      "supported; use bf16")
    if cfg.pair.max_length > m.max_position_embeddings - m.position_offset:
        offset = f" - model.position_offset ({m.position_offset})" if m.position_offset else ""
        errors.append(
            f"pair.max_length ({cfg.pair.max_length}) must be <= "
            f"model.max_position_embeddings ({m.max_position_embeddings}){offset}"
        )
    if cfg.pair.max_query_length >= cfg.pair.max_length:
        errors.append(
            f"pair.max_query_length ({cfg.pair.max_query_length}) must be < "
            f"pair.max_length ({cfg.pair.max_length})"
        )


def _check_trainer_and_optim(errors: list[str], cfg: Any) -> None:
    """The loop's cadence, retention and the optimizer."""
    trainer, o = cfg.trainer, cfg.optim
    for name in ("max_steps", "log_interval"):
        if getattr(trainer, name) <= 0:
            errors.append(f"trainer.{name} ({getattr(trainer, name)}) must be positive")
    for name in ("eval_interval", "save_interval"):
        if getattr(trainer, name) < 0:
            errors.append(f"trainer.{name} ({getattr(trainer, name)}) must be >= 0 (0 turns it off)")
    if o.warmup_steps < 0 or (o.warmup_steps and o.warmup_steps >= trainer.max_steps):
        # megatron's scheduler asserts warmup < decay steps, deep inside the first step.
        errors.append(
            f"optim.warmup_steps ({o.warmup_steps}) must be >= 0 and < trainer.max_steps "
            f"({trainer.max_steps})"
        )
    if not o.lr > 0:
        errors.append(f"optim.lr ({o.lr}) must be positive")
    if not 0 <= o.min_lr <= o.lr:
        errors.append(f"optim.min_lr ({o.min_lr}) must be between 0 and optim.lr ({o.lr})")
    if o.weight_decay < 0:
        errors.append(f"optim.weight_decay ({o.weight_decay}) must be >= 0")
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1):
        errors.append(f"optim.adam_beta1 ({o.adam_beta1}) and optim.adam_beta2 "
                      f"({o.adam_beta2}) must be in [0, 1)")
    if o.clip_grad < 0:
        errors.append(f"optim.clip_grad ({o.clip_grad}) must be >= 0 (0 turns clipping off)")
    if trainer.keep_last is not None and trainer.keep_last < 1:
        errors.append(f"trainer.keep_last ({trainer.keep_last}) must be >= 1, or null to keep all")
    if trainer.keep_best is not None:
        _choice(errors, "trainer.keep_best", trainer.keep_best, EVAL_METRICS)
        if not cfg.data.eval_collection or not (trainer.eval_interval or trainer.eval_at_end):
            errors.append("trainer.keep_best needs evaluation: data.eval_collection and "
                          "trainer.eval_interval (or trainer.eval_at_end)")
    if trainer.max_nonfinite_steps < 1:
        errors.append(f"trainer.max_nonfinite_steps ({trainer.max_nonfinite_steps}) must be >= 1")


def validate(cfg: Any, world_size: int) -> Derived:
    """Check ``cfg`` (a composed TrainConfig) for ``world_size`` ranks; return the derived sizes.

    Raises ConfigError listing every problem found, each naming its fields.
    """
    errors: list[str] = []
    _check_choices(errors, cfg)
    _check_model_shape(errors, cfg)
    dp, num_micro, budget = _batch_layout(errors, cfg, world_size)
    _check_data(errors, cfg)
    _check_task(errors, cfg)
    _check_pair(errors, cfg)
    _check_features(errors, cfg)
    _check_trainer_and_optim(errors, cfg)
    _check_peft(errors, cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    p = cfg.parallel
    return Derived(
        world_size=world_size,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        dp=dp,
        num_microbatches=num_micro,
        pairs_per_micro_batch=(1 if budget is not None else cfg.trainer.micro_batch_size)
        * cfg.task.group_size,
    )
