"""Write a Hugging Face model directory from a full (single-process) megarank model.

The directory loads on its own: safetensors weights (sharded with an index past ``max_shard_bytes``),
config.json, the tokenizer, and the scoring contract. A decoder export also carries its prompt as a
score template and vLLM's score-model fields (``templates.py``), for libraries and servers that do not read
scoring.json.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megarank.checkpoint.hf import ConversionError, iter_hf_tensors, read_hf_config
from megarank.checkpoint.hf_mappings import EXPORT_ARCHITECTURES
from megarank.checkpoint.templates import (
    TEMPLATE_FILE,
    score_template,
    serving_notes,
    vllm_fields,
)
from megarank.data.contract import FILE as CONTRACT_FILE
from megarank.data.contract import ScoringContract
from megarank.parallel.env import group_rank_and_size


def hf_model_type(model_cfg: Any) -> str:
    """The HF model_type a megarank backbone is exported as."""
    if model_cfg.hf_model_type:
        return model_cfg.hf_model_type
    if model_cfg.family == "bert":
        return "xlm-roberta" if model_cfg.encoder_head == "roberta" else "bert"
    if model_cfg.family == "deberta":
        return "deberta-v2"
    if model_cfg.qk_layernorm:
        return "qwen3"
    return "qwen2" if model_cfg.add_qkv_bias else "llama"


def hf_config_dict(cfg: Any, architecture: str, pad_token_id: int | None) -> dict[str, Any]:
    """config.json for the export: the source HF config when there is one, else built anew."""
    m = cfg.model
    mt = hf_model_type(m)
    if m.hf_path and (Path(m.hf_path) / "config.json").is_file():
        out = read_hf_config(m.hf_path)
    else:
        from transformers import AutoConfig

        fields: dict[str, Any] = dict(
            num_hidden_layers=m.num_layers, hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_hidden_size,
            vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
        )
        if m.family == "bert":
            fields.update(layer_norm_eps=m.layernorm_epsilon, type_vocab_size=m.type_vocab_size,
                          hidden_act="gelu", classifier_dropout=m.classifier_dropout)
            if m.position_offset:
                fields["pad_token_id"] = m.position_offset - 1  # RoBERTa's position rule
        elif m.family == "deberta":
            fields.update(_deberta_fields(m))
        else:
            rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rotary_base}
            if m.rope_scaling == "llama3":
                rope.update(rope_type="llama3", factor=m.rope_scaling_factor,
                            low_freq_factor=m.rope_low_freq_factor,
                            high_freq_factor=m.rope_high_freq_factor,
                            original_max_position_embeddings=m.rope_original_max_position_embeddings)
            fields.update(
                num_key_value_heads=m.num_query_groups or m.num_attention_heads,
                rms_norm_eps=m.layernorm_epsilon, hidden_act="silu",
                tie_word_embeddings=m.tie_word_embeddings, rope_parameters=rope,
            )
            if mt == "mistral":
                fields["sliding_window"] = m.sliding_window
            if m.head_dim:
                fields["head_dim"] = m.head_dim
        out = AutoConfig.for_model(mt, **fields).to_dict()
    out["architectures"] = [architecture]
    if architecture.endswith("ForSequenceClassification"):
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    return out


def _deberta_fields(m: Any) -> dict[str, Any]:
    """DebertaV2Config fields of a DeBERTa backbone built without an HF source."""
    return dict(
        layer_norm_eps=m.layernorm_epsilon, type_vocab_size=m.type_vocab_size, hidden_act="gelu",
        relative_attention=True, share_att_key=m.share_att_key,
        position_buckets=m.position_buckets,
        max_relative_positions=m.max_relative_positions, norm_rel_ebd=m.norm_rel_ebd,
        pos_att_type=list(m.pos_att_type), position_biased_input=m.position_biased_input,
        pooler_hidden_size=m.hidden_size, pooler_hidden_act="gelu",
        pooler_dropout=m.pooler_dropout, cls_dropout=m.classifier_dropout,
    )


def _export_tensors(params: Mapping[str, torch.Tensor], cfg: Any, as_classifier: bool,
                    answer_ids: tuple[int, int] | None, with_head: bool = True):
    """HF (name, tensor) pairs, each tensor read from ``params`` only when its turn comes; the
    yes/no head (``with_head``) becomes lm_head or a score row."""
    head = "head.output_weight"
    yield from iter_hf_tensors(((n, params[n]) for n in params if n != head), cfg)
    if cfg.pair.head != "yes_no" or not with_head:
        return
    w = params[head] if head in params else params["backbone.embedding.word_embeddings.weight"]
    if as_classifier:
        # logit(yes) - logit(no) = (w_yes - w_no) . h: one row, same scores.
        yield "score.weight", (w[answer_ids[0]] - w[answer_ids[1]])[None].clone()
    elif not cfg.model.tie_word_embeddings:
        yield "lm_head.weight", w[: cfg.model.vocab_size]


class _ShardWriter:
    """safetensors shards of at most ``max_bytes``, each written as soon as it is full; an
    index when there is more than one (names follow HF's model-0000i-of-0000n)."""

    def __init__(self, directory: Path, max_bytes: int, prefix: str = "") -> None:
        self.directory, self.max_bytes, self.prefix = directory, max_bytes, prefix
        self.shard: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        # A view of a larger tensor (a slice of a fused QKV or gate/up, the vocabulary rows of a
        # padded embedding) is copied, or it would keep the whole source alive in the shard.
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == nbytes
        self.shard[name] = tensor if whole else tensor.contiguous().clone()
        self.size += nbytes

    def _flush(self) -> None:
        path = self.directory / f"{self.prefix}shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.shard, path, metadata={"format": "pt"})
        self.written.append((path, list(self.shard), self.size))
        self.shard, self.size = {}, 0

    def close(self) -> list[tuple[str, list[str], int]]:
        """Write what is left; return (file name, tensor names, tensor bytes) of every shard."""
        if self.shard:
            self._flush()
        return [(p.name, names, size) for p, names, size in self.written]


class _Every(Mapping[str, torch.Tensor]):
    """Every ``world``-th parameter of ``params`` from ``rank`` on (all of them for one rank),
    read only when asked for; the rest stay reachable by name (the yes/no head's rows)."""

    def __init__(self, params: Mapping[str, torch.Tensor], rank: int, world: int) -> None:
        self.params = params
        self.names = [n for i, n in enumerate(params) if i % world == rank]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.params[name]

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(written: list[Any], world: int) -> list[Any]:
    """Every rank's shards, rank 0's first (the order of the parameters' split)."""
    if world == 1:
        return written
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, written)
    return [shard for rank_shards in everyone for shard in rank_shards]


def _name_shards(directory: Path, written: list[tuple[str, list[str], int]],
                 total: int) -> None:
    """Give the shards (of every rank, in order) HF's names, with an index past one."""
    if len(written) == 1:
        (directory / written[0][0]).rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (name, tensors, _) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        (directory / name).rename(directory / final)
        weight_map.update(dict.fromkeys(tensors, final))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def export_hf(params: Mapping[str, torch.Tensor], cfg: Any, out_dir: str | Path,
              tokenizer: Any, contract: ScoringContract | None, as_classifier: bool = False,
              answer_ids: tuple[int, int] | None = None, max_shard_bytes: int = 5 * 1024**3,
              dtype: torch.dtype | None = None) -> Path:
    """Write a single-process megarank model's tensors as an HF model directory.

    ``params``: parameter name -> full tensor, e.g. a :class:`~megarank.checkpoint.stream.
    CheckpointTensors` that reads each one from a checkpoint when it is asked for. Shards are
    written as they fill, so at most about one shard plus the tensors being merged is held.
    ``dtype`` casts every tensor (default: as stored) and sets config.json's ``torch_dtype``.
    With a process group (torchrun) every rank converts and writes its share of the tensors
    and rank 0 completes the directory; the call is then collective.
    """
    out = Path(out_dir)
    partial = out.parent / f"{out.name}.partial"
    rank, world = group_rank_and_size()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(world)
    mt = hf_model_type(cfg.model)
    head = "classifier" if (cfg.pair.head == "classifier" or as_classifier) else "yes_no"
    key = (mt, head)
    if key not in EXPORT_ARCHITECTURES:
        raise ConversionError(f"cannot export model_type {mt} with a {head} head")
    arch = EXPORT_ARCHITECTURES[key]

    # Under torchrun each rank converts every world-th parameter into shards of its own; rank 0
    # then names them all in order and writes the rest.
    writer = _ShardWriter(partial, max_shard_bytes, prefix=f"rank{rank:05d}-")
    mine = _Every(params, rank, world)
    stored_dtype = None
    for name, tensor in _export_tensors(mine, cfg, as_classifier, answer_ids, rank == 0):
        stored_dtype = stored_dtype or tensor.dtype
        writer.add(name, tensor if dtype is None else tensor.to(dtype))
    written = _gather(writer.close(), world)
    if rank != 0:
        _barrier(world)
        return out
    stored_dtype = stored_dtype or next(iter(params.values())).dtype
    _name_shards(partial, written, sum(size for _, _, size in written))
    _write_metadata(partial, cfg, arch, head, tokenizer, contract,
                    str(dtype or stored_dtype).removeprefix("torch."))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    _barrier(world)  # the other ranks return once the directory is complete
    return out


def _write_metadata(partial: Path, cfg: Any, arch: str, head: str, tokenizer: Any,
                    contract: ScoringContract | None, torch_dtype: str) -> None:
    """config.json, the tokenizer (with the scoring prompt as its chat template) and the
    scoring contract of an HF export being written into ``partial``."""
    mt = hf_model_type(cfg.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = hf_config_dict(cfg, arch, pad)
    config["torch_dtype"] = torch_dtype
    template = None
    if contract is not None:
        config.update(vllm_fields(contract, tokenizer, head, mt))
        template = score_template(contract, tokenizer.bos_token)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    if template is not None:
        # The tokenizer carries the prompt too (tokenizer.apply_chat_template, CrossEncoder).
        (partial / TEMPLATE_FILE).write_text(template)
        saved, tokenizer.chat_template = tokenizer.chat_template, template
        try:
            tokenizer.save_pretrained(partial)
        finally:
            tokenizer.chat_template = saved
    else:
        tokenizer.save_pretrained(partial)
    if contract is not None:
        # A yes/no head exported as a classifier scores through score.weight: say so (and
        # drop the answer tokens, which a classifier's contract has not).
        exported = contract if head == contract.head else replace(
            contract, head=head, yes_token_id=None, no_token_id=None)
        record = {**asdict(exported), "serving": serving_notes(exported, head, arch)}
        (partial / CONTRACT_FILE).write_text(json.dumps(record, indent=2))
