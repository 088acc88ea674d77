"""Transformer Engine layer names: with megatron's TE spec a decoder's pre-norms live inside the
fused linears (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``). HF import,
HF export and megarank checkpoints (``model.init_from``, resume) map them both ways.

TE is not installed here, so the spec is megatron's own ``get_gpt_layer_with_transformer_engine_spec``
built through a backend whose fused LayerNorm+linear is a stand-in with TE's parameter names and
computation (RMSNorm, then the column-parallel linear): the module tree and every name are the
ones that function gives with TE.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel import ColumnParallelLinear
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from megarank.bundle import build_bundle
from megarank.checkpoint.hf import iter_hf_tensors
from megarank.checkpoint.sharded import save_model_checkpoint
from megarank.config import compose
from megarank.data.batch import PairBatch
from megarank.eval.scorer import score_batches
from megarank.models.attention import SDPAttention
from tests.helpers.hf_tiny import random_batch, save_tiny

TE_NORMS = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
LOCAL_NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight")


class NormColumnParallelLinear(ColumnParallelLinear):
    """TELayerNormColumnParallelLinear's parameters (``layer_norm_weight`` beside ``weight``) and
    computation (RMSNorm, then the column-parallel linear), on megatron's local layers."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype))
        self.eps = config.layernorm_epsilon

    def forward(self, x, *args, **kwargs):
        x = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(x, *args, **kwargs)


class TEStandIns(LocalSpecProvider):
    """megatron's TE backend, with stand-ins for the TE modules."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return NormColumnParallelLinear

    def core_attention(self) -> type:
        return SDPAttention


@pytest.fixture
def te_spec(monkeypatch):
    """Decoders built from megatron's TE spec (through the stand-in backend)."""
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TEStandIns, raising=False)

    def spec(normalization, qk_layernorm, kernels):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=qk_layernorm)

    monkeypatch.setattr("megarank.models.build.gpt_layer_spec", spec)
    return monkeypatch


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: save_tiny(k, root) for k in ("llama", "qwen3")}


def _scores(bundle, batch) -> torch.Tensor:
    b = PairBatch(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                  batch["last"], 1, 0)
    return score_batches(bundle.model, bundle.runtime, [b])


def _reference(hf_dir, batch) -> torch.Tensor:
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_hf_import_and_export_with_te_names(te_spec, models, kind):
    batch = random_batch(kind=kind)
    with build_bundle(compose(["model=hf", f"model.hf_path={models[kind]}"]),
                     device="cpu") as bundle:
        names = [n for n, _ in bundle.model.module.named_parameters()]
        for te, local in zip(TE_NORMS, LOCAL_NORMS, strict=True):
            assert f"backbone.decoder.layers.0.{te}" in names
            assert not any(n.endswith(local) for n in names)
        # import: the TE-named norms hold HF's input / post-attention norms
        torch.testing.assert_close(_scores(bundle, batch), _reference(models[kind], batch),
                                   atol=1e-5, rtol=0)
        # export: back to HF's names, bitwise
        state = {n: p.detach() for n, p in bundle.model.module.named_parameters()}
        exported = dict(iter_hf_tensors(state.items(), bundle.cfg))
    original = load_file(models[kind] / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_checkpoints_move_between_local_and_te_names(te_spec, models, tmp_path):
    hf = models["llama"]
    batch = random_batch(kind="llama")
    reference = _reference(hf, batch)
    cfg = lambda: compose(["model=hf", f"model.hf_path={hf}"])  # noqa: E731

    def save(bundle, path):
        from omegaconf import OmegaConf

        save_model_checkpoint(path, bundle.model, bundle.runtime,
                              meta={"config": OmegaConf.to_container(bundle.cfg, resolve=True)})

    # TE names -> checkpoint (written with the local names) -> a local-spec model
    with build_bundle(cfg(), device="cpu") as bundle:
        sd = bundle.model.module.sharded_state_dict()
        keys = {v.key for v in sd.values() if hasattr(v, "key")}
        assert "backbone.decoder.layers.input_layernorm.weight" in keys  # layers stacked
        assert not any(k.endswith(TE_NORMS) for k in keys)
        save(bundle, tmp_path / "from_te")
    te_spec.undo()
    with build_bundle(cfg(), load_hf=False, device="cpu", checkpoint=tmp_path / "from_te") as local:
        assert any(n.endswith(LOCAL_NORMS[0]) for n, _ in local.model.module.named_parameters())
        torch.testing.assert_close(_scores(local, batch), reference, atol=1e-5, rtol=0)
        save(local, tmp_path / "from_local")
    # local names -> a TE-spec model (model.init_from's path: load_model_weights)
    from megatron.core.models.gpt import gpt_layer_specs

    te_spec.setattr(gpt_layer_specs, "TESpecProvider", TEStandIns, raising=False)
    te_spec.setattr("megarank.models.build.gpt_layer_spec",
                    lambda n, q, k: gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
                        qk_layernorm=q))
    with build_bundle(cfg(), load_hf=False, device="cpu",
                     checkpoint=tmp_path / "from_local") as te:
        params = dict(te.model.module.named_parameters())
        assert f"backbone.decoder.layers.0.{TE_NORMS[0]}" in params
        assert not torch.equal(params[f"backbone.decoder.layers.0.{TE_NORMS[0]}"],
                               torch.ones(64))  # loaded, not its ones init
        torch.testing.assert_close(_scores(te, batch), reference, atol=1e-5, rtol=0)
