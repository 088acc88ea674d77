"""LoRA and DoRA checkpoints to and from Hugging Face: a merged model, or a PEFT adapter directory.

A LoRA checkpoint holds the adapters (``...linear_qkv.lora.a0`` / ``b0`` ..., one pair per HF
projection; DoRA adds the magnitude ``m0`` ..., PEFT's ``lora_magnitude_vector``) and the trained
head; its frozen base is the HF model (``model.hf_path``) or the
megarank checkpoint (``model.init_from``) it was trained from, recorded in its config.

- :class:`MergedTensors`: the full model's tensors with ``W + (alpha / r) * B A`` folded in
  (DoRA: ``m / ||W + (alpha / r) B A|| * (W + (alpha / r) B A)`` row by row), read
  one at a time (the streaming HF export takes it where it takes a checkpoint's tensors).
- :func:`export_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors`` with HF
  parameter names, which ``peft.PeftModel.from_pretrained(base, dir)`` loads onto the base.
- :func:`read_adapter` / :func:`load_adapter`: a PEFT LoRA adapter as megarank's peft settings and
  its tensors loaded into a built model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megarank.checkpoint.hf import (
    ConversionError,
    HFWeights,
    hf_names,
    match,
    to_megarank,
)
from megarank.checkpoint.hf_mappings import rules_for
from megarank.config import padded_vocab_size
from megarank.models.dora import DoraAdapter
from megarank.models.lora import ADAPTER, PARALLEL, delta_weights
from megarank.models.specs import TE_FUSED_NORMS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_ADAPTER_KEY = re.compile(rf"^(.+)\.{ADAPTER}\.([abm])(\d+)$")
MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude, one per HF projection


def _hf_module(hf_weight: str) -> str:
    return hf_weight.removesuffix(".weight")


class HFAsMegarank(Mapping[str, torch.Tensor]):
    """An HF model directory's tensors under megarank's full (single-process) parameter names,
    each converted when asked for."""

    def __init__(self, hf_dir: str | Path, cfg: Any) -> None:
        self.cfg, self.weights = cfg, HFWeights(hf_dir)
        self.rules = rules_for(cfg.model)
        self._names: dict[str, tuple[Any, list[str]]] = {}
        for rule in self.rules:
            if any(rule.ours.endswith(te) for te in TE_FUSED_NORMS):
                continue  # the local spec's names only
            layers = range(cfg.model.num_layers) if "{i}" in rule.ours else [None]
            for layer in layers:
                names = hf_names(rule, layer)
                if all(n in self.weights for n in names):
                    self._names[rule.ours.format(i=layer)] = (rule, names)

    def __getitem__(self, name: str) -> torch.Tensor:
        rule, names = self._names[name]
        return to_megarank(rule, [self.weights.get(n) for n in names], self.cfg.model,
                           padded_vocab_size(self.cfg.model))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def adapter_linears(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """linear name -> number of (A, B) pairs, of the adapters among a checkpoint's tensors."""
    found: dict[str, int] = {}
    for name in tensors:
        m = _ADAPTER_KEY.match(name)
        if m and m.group(2) == "a":
            found[m.group(1)] = max(found.get(m.group(1), 0), int(m.group(3)) + 1)
    return found


def base_tensors(cfg: Any, checkpoint: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Where a LoRA checkpoint's frozen base is read from: the checkpoint itself when it holds
    it (a base that came from nowhere else), else ``model.init_from`` or ``model.hf_path``."""
    from megarank.checkpoint.sharded import resolve_checkpoint
    from megarank.checkpoint.stream import CheckpointTensors

    if cfg.model.init_from:
        return CheckpointTensors(resolve_checkpoint(cfg.model.init_from))
    if cfg.model.hf_path:
        if not Path(cfg.model.hf_path).is_dir():
            raise ConversionError(f"the LoRA checkpoint's base model.hf_path "
                                  f"({cfg.model.hf_path}) is not there")
        return HFAsMegarank(cfg.model.hf_path, cfg)
    return checkpoint


class MergedTensors(Mapping[str, torch.Tensor]):
    """A LoRA model's full tensors with the adapters merged: ``W + (alpha / r) * B A`` per HF
    projection, folded into megatron's fused layout by the same transform as the weights; for
    DoRA each row o of that is then scaled by ``m[o] / ||row o||`` (PEFT's merge)."""

    def __init__(self, checkpoint: Mapping[str, torch.Tensor], cfg: Any) -> None:
        self.ckpt, self.cfg = checkpoint, cfg
        self.base = base_tensors(cfg, checkpoint)
        self.linears = adapter_linears(checkpoint)
        self.scale = cfg.peft.alpha / cfg.peft.rank
        own = [n for n in checkpoint if not _ADAPTER_KEY.match(n)]
        self._own = set(own)
        self._names = list(dict.fromkeys([*self.base, *own]))

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.ckpt[name] if name in self._own else self.base[name]
        linear = name.removesuffix(".weight")
        if not name.endswith(".weight") or linear not in self.linears:
            return t
        n = self.linears[linear]
        a = [self.ckpt[f"{linear}.{ADAPTER}.a{i}"] for i in range(n)]
        b = [self.ckpt[f"{linear}.{ADAPTER}.b{i}"] for i in range(n)]
        rule, _ = match(name, rules_for(self.cfg.model))
        vocab = padded_vocab_size(self.cfg.model)
        merged = t.float() + to_megarank(rule, delta_weights(a, b, self.scale), self.cfg.model,
                                         vocab)
        if f"{linear}.{ADAPTER}.m0" in self.ckpt:  # DoRA: each row rescaled to its magnitude
            m = to_megarank(rule, [self.ckpt[f"{linear}.{ADAPTER}.m{i}"].float()
                                   for i in range(n)], self.cfg.model, vocab)
            merged = merged * (m / torch.linalg.vector_norm(merged, dim=1))[:, None]
        return merged.to(t.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _head_modules(cfg: Any) -> list[str]:
    """PEFT ``modules_to_save`` of a trained head, by HF module name."""
    if cfg.model.family == "gpt":
        return ["score"]
    return ["classifier"] if cfg.model.encoder_head == "roberta" else ["classifier", "pooler"]


def base_reference(cfg: Any) -> str:
    """The HF model an adapter applies to: ``model.hf_path``, or the HF source that
    ``model.init_from`` was imported from."""
    from megarank.checkpoint.sharded import read_meta

    if cfg.model.hf_path:
        return str(cfg.model.hf_path)
    if cfg.model.init_from:
        source = read_meta(cfg.model.init_from).get("source")
        if source and (Path(source) / "config.json").is_file():
            return str(source)
    raise ConversionError("a PEFT adapter applies to a Hugging Face base, and this LoRA run's "
                          "base is neither model.hf_path nor a checkpoint imported from one: "
                          "export the merged model instead (without an adapter)")


def _adapter_tensors(checkpoint: Mapping[str, torch.Tensor], cfg: Any,
                     dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint's adapters under PEFT's names (``lora_A`` / ``lora_B``, DoRA's magnitude),
    and the HF modules they adapt."""
    rules = rules_for(cfg.model)
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for linear, n in adapter_linears(checkpoint).items():
        rule, layer = match(f"{linear}.weight", rules)
        for i, hf in enumerate(hf_names(rule, layer)[:n]):
            module = _hf_module(hf)
            modules.append(module)
            keys = [("a", "lora_A.weight"), ("b", "lora_B.weight")]
            if f"{linear}.{ADAPTER}.m{i}" in checkpoint:
                keys.append(("m", MAGNITUDE))
            for which, key in keys:
                t = checkpoint[f"{linear}.{ADAPTER}.{which}{i}"]
                tensors[f"{PEFT_PREFIX}{module}.{key}"] = (
                    t if dtype is None else t.to(dtype)).contiguous()
    return tensors, modules


def export_adapter(checkpoint: Mapping[str, torch.Tensor], cfg: Any, out_dir: str | Path,
                   tokenizer: Any, contract: Any = None, dtype: torch.dtype | None = None) -> Path:
    """Write a LoRA/DoRA checkpoint's adapters (and trained head) as a PEFT adapter directory."""
    from dataclasses import asdict

    from peft import LoraConfig, TaskType

    from megarank.checkpoint.hf import iter_hf_tensors
    from megarank.data.contract import FILE as CONTRACT_FILE

    base = base_reference(cfg)
    tensors, modules = _adapter_tensors(checkpoint, cfg, dtype)
    own = [(n, checkpoint[n]) for n in checkpoint if not _ADAPTER_KEY.match(n)]
    stray = [n for n, _ in own if not n.startswith("head.")]
    if stray:
        raise ConversionError(f"the checkpoint holds trained weights outside the adapters and "
                              f"head ({stray[0]}, ...): export the merged model instead")
    head_trained = bool(own) and cfg.pair.head == "classifier"
    for hf, t in iter_hf_tensors(own, cfg):
        tensors[f"{PEFT_PREFIX}{hf}"] = (t if dtype is None else t.to(dtype)).contiguous()
    task = TaskType.SEQ_CLS if cfg.pair.head == "classifier" else TaskType.CAUSAL_LM
    config = LoraConfig(
        r=cfg.peft.rank, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
        target_modules=sorted(set(modules)), bias="none", task_type=task,
        modules_to_save=_head_modules(cfg) if head_trained else None,
        base_model_name_or_path=base, use_dora=cfg.peft.method == "dora",
    )
    out = Path(out_dir)
    partial = out.parent / f"{out.name}.partial"
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config.save_pretrained(str(partial))
    save_file(tensors, partial / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    tokenizer.save_pretrained(partial)
    if contract is not None:
        (partial / CONTRACT_FILE).write_text(json.dumps(asdict(contract), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], list[str]]:
    """A PEFT LoRA or DoRA (``use_dora``) adapter's settings, checked for what megarank
    computes, and its ``peft`` overrides (``peft=lora`` or ``peft=dora`` first)."""
    path = Path(adapter_dir)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ConversionError(f"{path}: not a PEFT adapter directory (needs {ADAPTER_CONFIG} "
                              f"and {ADAPTER_WEIGHTS})")
    conf = json.loads(cfg_file.read_text())
    problems = []
    if conf.get("peft_type") != "LORA":
        problems.append(f"peft_type {conf.get('peft_type')!r} (only LORA)")
    for key in ("use_rslora", "fan_in_fan_out", "lora_bias", "use_qalora"):
        if conf.get(key):
            problems.append(f"{key}=true")
    for key in ("rank_pattern", "alpha_pattern"):
        if conf.get(key):
            problems.append(f"a {key}")
    if conf.get("bias", "none") != "none":
        problems.append(f"bias={conf['bias']!r}")
    if problems:
        raise ConversionError(f"{cfg_file}: megarank cannot represent {', '.join(problems)}")
    return conf, [f"peft={'dora' if conf.get('use_dora') else 'lora'}", f"peft.rank={conf['r']}",
                  f"peft.alpha={conf['lora_alpha']}",
                  f"peft.dropout={conf.get('lora_dropout', 0.0)}"]


def adapter_targets(adapter_dir: str | Path, cfg: Any) -> list[str]:
    """The megatron linears (peft.targets) an adapter's HF modules belong to."""
    from safetensors import safe_open

    rules = [r for r in rules_for(cfg.model) if r.ours.endswith(".weight")]
    with safe_open(Path(adapter_dir) / ADAPTER_WEIGHTS, framework="pt") as f:
        keys = list(f.keys())  # the names only: no tensor is read
    targets: set[str] = set()
    for key in keys:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        hf = f"{module}.weight"
        for rule in rules:
            pattern = re.compile("^" + "|".join(
                re.escape(n).replace(r"\{i\}", r"\d+") for n in rule.hf) + "$")
            if pattern.match(hf):
                target = rule.ours.split(".")[-2]
                if target not in PARALLEL:
                    raise ConversionError(f"{adapter_dir}: an adapter on {module}, which megarank "
                                          "cannot put adapters on")
                targets.add(target)
                break
        else:
            raise ConversionError(f"{adapter_dir}: {module} is not a module of this model")
    return [t for t in PARALLEL if t in targets]


def _load_magnitude(adapter: Any, i: int, tensors: Mapping[str, torch.Tensor], module: str,
                    adapter_dir: str | Path) -> list[str]:
    """DoRA: projection ``i``'s magnitude from the adapter (a DoRA model needs one, a LoRA
    model takes none)."""
    key = f"{PEFT_PREFIX}{module}.{MAGNITUDE}"
    if isinstance(adapter, DoraAdapter) != (key in tensors):
        raise ConversionError(f"{adapter_dir}: {module} {'lacks' if key not in tensors else 'has'}"
                              f" a DoRA {MAGNITUDE} and the model is "
                              f"{'DoRA' if key not in tensors else 'LoRA'} (peft.method)")
    if key not in tensors:
        return []
    adapter.set_magnitude(i, tensors[key].float())
    return [key]


def load_adapter(adapter_dir: str | Path, model: torch.nn.Module, cfg: Any,
                 whole_model: bool = True) -> list[str]:
    """Copy a PEFT adapter's A/B tensors (and saved head) into a built LoRA model (this rank's
    parts). Projections the adapter does not cover keep B = 0. ``whole_model``: this stage is
    the whole model (no pipeline split), so every tensor of the adapter must find its place.
    Returns the HF keys used."""
    from megarank.checkpoint.sharded import innermost
    from megarank.models.lora import adapters

    inner = innermost(model)
    tensors = load_file(Path(adapter_dir) / ADAPTER_WEIGHTS)
    rules = rules_for(cfg.model)
    used: list[str] = []
    for linear, _, adapter in adapters(inner):
        rule, layer = match(f"{linear}.weight", rules)
        for i, hf in enumerate(hf_names(rule, layer)):
            module = _hf_module(hf)
            ka, kb = f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"
            if ka in tensors:
                adapter.set_full(i, tensors[ka].float(), tensors[kb].float())
                used += [ka, kb]
                used += _load_magnitude(adapter, i, tensors, module, adapter_dir)
    if inner.head is not None:
        for name, param in inner.head.named_parameters(prefix="head"):
            found = match(name, rules)
            key = f"{PEFT_PREFIX}{hf_names(*found)[0]}" if found else None
            if key in tensors:
                with torch.no_grad():
                    param.copy_(tensors[key].reshape(param.shape))
                used.append(key)
    unused = sorted(set(tensors) - set(used))
    if unused and whole_model:
        raise ConversionError(f"{adapter_dir}: tensors megarank did not place: {unused[:3]}")
    return used
