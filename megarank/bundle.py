"""The model bundle builder: the one place a runnable model (this rank's part of it, with its
runtime, tokenizer, scoring contract and collator) is assembled, for every command.

    config -> validation -> runtime -> tokenizer -> scoring contract -> model -> weights -> collator

:func:`build_bundle` does it for a composed config (training, an HF import); :func:`open_bundle`
for a saved model, a megarank checkpoint, a run directory or an HF export, whose ``scoring.json``
decides how it scores and is checked against what the config would build. The pair collator is
built from the contract (family, pooled token, prompt, lengths), never from re-derived config, so
what the contract records is what the model does. A :class:`ModelBundle` owns the process group it
brought up: ``close()`` (or leaving its ``with`` block) shuts it down, also when building fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoTokenizer

from megarank.checkpoint.hf import apply_hf_config, load_hf_weights
from megarank.checkpoint.sharded import META_FILE, load_model_weights, read_meta, resolve_checkpoint
from megarank.config import (
    Derived,
    check_mandatory,
    compose,
    from_saved,
    padded_vocab_size,
    validate,
)
from megarank.data.collate import PairCollator
from megarank.data.contract import FILE as CONTRACT_FILE
from megarank.data.contract import (
    ScoringContract,
    check_against,
    make_contract,
    pair_fields,
    read_contract,
)
from megarank.eval.rerank import score_pairs
from megarank.eval.scorer import PairScorer
from megarank.models.build import (
    build_cross_encoder,
    sync_pipeline_shared,
    sync_tied_output_layer,
    transformer_config,
)
from megarank.models.dora import add_dora, reset_magnitudes
from megarank.models.lora import add_adapters
from megarank.models.specs import KernelChoice, check_kernel_support, select_kernels
from megarank.parallel.env import env_world_size
from megarank.parallel.megatron import wrap_model
from megarank.parallel.runtime import (
    Runtime,
    cpu_half_precision_note,
    init_runtime,
    keep_freed_memory,
    shutdown,
)

logger = logging.getLogger("megarank")  # the run's logger (training/logs.py sets it up)


def peft_enabled(cfg: DictConfig) -> bool:
    """Whether the run trains adapters (``peft.method`` lora, qlora or dora) instead of every
    weight."""
    return cfg.get("peft") is not None and cfg.peft.method != "none"


@dataclass
class ModelBundle:
    """This rank's part of a built model, with everything needed to run or score it."""

    cfg: DictConfig
    """The resolved config (HF geometry and contract fields applied)."""
    derived: Derived
    runtime: Runtime
    tokenizer: Any
    contract: ScoringContract
    """How this model scores a pair; the collator follows it."""
    collator: PairCollator
    model: Any
    """The cross-encoder stage in megatron's DDP (and Float16Module for bf16/fp16)."""
    kernels: KernelChoice
    weights: str | None = None
    """Where the weights came from: a checkpoint path, an HF directory, or None (fresh init)."""

    def close(self) -> None:
        """Shut down megatron's parallel state and the process group (safe to call twice)."""
        shutdown()

    def __enter__(self) -> ModelBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_bundle(cfg: DictConfig, *, load_hf: bool = True, expect: ScoringContract | None = None,
                device: str | None = None, checkpoint: str | Path | None = None) -> ModelBundle:
    """Validate ``cfg`` for this world, bring up the runtime and build this rank's stage.

    ``load_hf``: read ``model.hf_path``'s weights (when set) into the stage, sharded to this
    rank. ``checkpoint``: load a megarank checkpoint's model weights instead (any layout).
    ``expect``: a saved scoring contract; the contract ``cfg`` derives must equal it, or building
    stops naming each differing config field. ``device`` overrides
    ``trainer.device``. On any error the runtime is shut down before it propagates.
    """
    apply_hf_config(cfg)
    check_mandatory(cfg)
    derived = validate(cfg, env_world_size())
    runtime = init_runtime(derived.tp, derived.pp, cfg.trainer.seed, device or cfg.trainer.device)
    if runtime.device.type == "cpu" and cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    note = cpu_half_precision_note(cfg.trainer.precision, runtime.device)
    if note and runtime.is_main:  # train, score, serve and evaluate all start here
        logger.warning(note)
    try:
        tokenizer = build_tokenizer(cfg)
        contract = checked_contract(cfg, tokenizer, expect)
        weights = None
        # A LoRA checkpoint holds adapters and head; its base comes from where training read it.
        base_elsewhere = checkpoint is not None and peft_enabled(cfg)
        if cfg.model.hf_path and ((checkpoint is None and load_hf) or base_elsewhere):
            weights = str(cfg.model.hf_path)
        model, kernels = build_model(cfg, runtime, contract, load_hf=weights is not None)
        if base_elsewhere and cfg.model.init_from:
            load_model_weights(cfg.model.init_from, model, part="base")
        if checkpoint is not None:
            weights = str(load_model_weights(checkpoint, model))
        collator = build_collator(cfg, contract, tokenizer)
    except BaseException:
        shutdown()
        raise
    return ModelBundle(cfg, derived, runtime, tokenizer, contract, collator, model, kernels, weights)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a megarank checkpoint or a run directory (else: an HF directory)."""
    path = Path(path)
    return (path / META_FILE).is_file() or (path / "checkpoints").is_dir()


def saved_config(source: str | Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, Path]:
    """(config, resolved path) of a checkpoint / run directory (its saved config on today's
    schema) or of an HF directory (``model=hf`` with its geometry), with ``overrides``."""
    path = Path(source)
    if is_checkpoint(path):
        path = resolve_checkpoint(path)
        return from_saved(read_meta(path)["config"], list(overrides)), path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a megarank checkpoint, a run directory nor a "
                                "Hugging Face model directory (no config.json)")
    # An HF export of megarank's carries its scoring contract and no megarank config: the
    # contract gives the pair format's fields (overrides win, and are then checked against it).
    cfg = compose(["model=hf", f"model.hf_path={path.resolve()}", *overrides])
    apply_hf_config(cfg)
    if (path / CONTRACT_FILE).is_file():
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        for name, value in saved_pair_fields(read_contract(path), path).items():
            if f"pair.{name}" not in given:
                cfg.pair[name] = value
    return cfg, path


def saved_pair_fields(contract: ScoringContract, path: Path) -> dict[str, Any]:
    """The ``pair`` fields of an HF export's contract, its answer tokens read back as text."""
    fields = pair_fields(contract)
    if contract.yes_token_id is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        fields["yes_token"] = tokenizer.decode([contract.yes_token_id])
        fields["no_token"] = tokenizer.decode([contract.no_token_id])
    return fields


def open_bundle(source: str | Path, overrides: Sequence[str] = (), *, device: str | None = None,
               require_contract: bool = True) -> ModelBundle:
    """A saved model ready to score: a checkpoint, a run directory (its latest checkpoint) or an
    HF export, with its weights loaded into the layout ``overrides`` ask for (e.g.
    ``parallel=tp2_pp1`` under torchrun) and its ``scoring.json`` checked: an override that
    would score pairs otherwise than it says is refused, naming the field.

    ``require_contract=False`` accepts a checkpoint without ``scoring.json`` (the contract is
    then derived from its config).
    """
    cfg, path = saved_config(source, overrides)
    expect = None
    if require_contract or (path / CONTRACT_FILE).is_file():
        expect = read_contract(path)
    if is_checkpoint(source):
        return build_bundle(cfg, load_hf=False, expect=expect, device=device, checkpoint=path)
    return build_bundle(cfg, expect=expect, device=device)


def saved_contract(checkpoint: str | Path) -> tuple[DictConfig, Any, ScoringContract]:
    """(config, tokenizer, scoring contract) of a checkpoint, without building its model:
    its ``scoring.json`` when it has one (checked against what its config derives), else the
    derived contract."""
    cfg, path = saved_config(checkpoint)
    expect = read_contract(path) if (path / CONTRACT_FILE).is_file() else None
    tokenizer = build_tokenizer(cfg)
    return cfg, tokenizer, checked_contract(cfg, tokenizer, expect)


def checked_contract(cfg: DictConfig, tokenizer: Any,
                     expect: ScoringContract | None) -> ScoringContract:
    """The contract ``cfg``'s pair format and ``tokenizer`` derive; it must equal a saved one
    (``expect``), or the differing config fields are named."""
    contract = make_contract(cfg.pair, cfg.model.family, tokenizer)
    if expect is not None:
        check_against(expect, contract, CONTRACT_FILE)
    return contract


def build_tokenizer(cfg: DictConfig) -> Any:
    """The model's HF tokenizer; its vocabulary must fit the model's."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(
            f"model.tokenizer ({cfg.model.tokenizer}) has {len(tokenizer)} tokens but "
            f"model.vocab_size is {cfg.model.vocab_size}"
        )
    return tokenizer


def build_collator(cfg: DictConfig, contract: ScoringContract, tokenizer: Any) -> PairCollator:
    """Pair tokenization as the scoring contract records it (from the config come only the
    batch padding multiple or packing and MaxP training's windows, which change no score)."""
    d = cfg.data
    return PairCollator(
        tokenizer, contract, pad_to_multiple_of=d.pad_to_multiple_of,
        train_windows=d.train_passages if d.passages == "max" else 1,
        window_stride=d.passage_stride,
        packed_multiple=d.packed_multiple if d.packing else None,
    )


def build_model(cfg: DictConfig, runtime: Runtime, contract: ScoringContract,
                load_hf: bool = True) -> tuple[Any, KernelChoice]:
    """This rank's cross-encoder stage, on its device, wrapped in megatron DDP.

    With ``load_hf`` the stage's weights are read from ``model.hf_path``, sharded to this rank's
    part of the layout. The yes/no head's token ids come from the contract.
    """
    kernels = select_kernels(cfg.trainer.kernels, runtime.device)
    if peft_enabled(cfg) and kernels.name == "te":
        kernels = KernelChoice("local", "peft: LoRA adapters run on megatron's local layers "
                                        "(TE fuses each norm into the linear the adapter reads)")
    if cfg.model.family == "deberta" and kernels.name == "te":
        kernels = KernelChoice("local", "model.family deberta: disentangled attention runs on "
                                        "megatron's local layers (megarank.models.specs)")
    if cfg.data.packing and kernels.name == "te":
        kernels = KernelChoice("local", "data.packing: packed rows attend through megarank's "
                                        "varlen/SDPA core attention, not TE's")
    check_kernel_support(cfg.parallel.sequence_parallel, kernels)
    tconfig = transformer_config(cfg, runtime.device, kernels.name)
    ids = None
    if cfg.pair.head == "yes_no":
        ids = (contract.yes_token_id, contract.no_token_id)
    model = build_cross_encoder(cfg, tconfig, kernels, runtime.is_first_stage, runtime.is_last_stage, ids)
    if load_hf:
        missing = load_hf_weights(
            model, cfg.model.hf_path, cfg, runtime.tp_rank, runtime.tp_size, runtime.pp_rank, runtime.pp_size,
            padded_vocab_size(cfg.model),
        )
        init_missing(model, missing, cfg.model.init_method_std)
        params = dict(model.named_parameters())
        for name in missing:  # not in the base: a LoRA checkpoint must hold them
            params[name].not_in_base = True
        if missing and runtime.tp_rank == 0 and runtime.dp_rank == 0:
            logger.warning(f"{cfg.model.hf_path} holds no weights for {', '.join(missing)}: "
                           "they start from a fresh initialisation")
    sync_tied_output_layer(model)
    sync_pipeline_shared(model)
    if peft_enabled(cfg):
        # Before DDP: it allocates gradient buffers for what still trains.
        (add_dora if cfg.peft.method == "dora" else add_adapters)(
            model, cfg, runtime.tp_rank, runtime.tp_size)
        model.frozen_base_external = bool(cfg.model.hf_path or cfg.model.init_from)
    model.to(runtime.device)
    if peft_enabled(cfg):
        reset_magnitudes(model)  # DoRA: from the base just loaded, on the device (collective)
    ddp = wrap_model(model, tconfig, cfg.trainer.precision,
                     cfg.parallel.use_distributed_optimizer)
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


class Scorer:
    """A saved model ready to score (query, document) pairs, as its scoring contract says.

    Under torchrun every rank must call :meth:`score` with the same pairs (the work is split over
    data-parallel ranks and every rank gets all scores).
    """

    def __init__(self, bundle: ModelBundle, batch_size: int = 64) -> None:
        self.bundle = bundle
        """The model stage: config, runtime, tokenizer, contract, collator, model."""
        d = bundle.cfg.data  # FirstP or MaxP (data.passages)
        self._scorer = PairScorer(bundle.collator, batch_size, d.passages)

    def score(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float]:
        """The score of every (query text, document text) pair, in order."""
        return score_pairs(self._scorer, self.bundle.model, self.bundle.runtime, list(pairs),
                           progress=progress).tolist()

    def close(self) -> None:
        """Shut down the process group the model was built in."""
        self.bundle.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_scorer(model: str | Path, overrides: Sequence[str] = (), *, device: str | None = None,
                batch_size: int = 64) -> Scorer:
    """A megarank checkpoint, run directory (its latest checkpoint) or HF export, as a
    :class:`Scorer`; its ``scoring.json`` is checked against what the config would build."""
    return Scorer(open_bundle(model, overrides, device=device), batch_size)
