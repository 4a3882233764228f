"""Layer specs: ``model.transformer_impl`` picks the spec, the local spec saves the keys of
Megatron-Core's Transformer Engine spec (checkpoints move both ways), and full recompute
covers every layer class of every spec, in FP8 through Transformer Engine's checkpoint."""

import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import ModelConfig

backends.install("cpu")
from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
from megatron.core.extensions import transformer_engine as te  # noqa: E402

from megatron_hybrid import mcore  # noqa: E402
from megatron_hybrid.model import build, specs, stack  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402

MODEL = ModelConfig(pattern="M*-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=16,
                    mamba_state_dim=8, mamba_num_groups=2, vocab_size=64, seq_length=32)
MIXER = build.mixer_params(MODEL)
LAYER_SLOTS = ("mamba_layer", "attention_layer", "mlp_layer", "moe_layer")


def test_transformer_impl_is_checked_in_one_line():
    with pytest.raises(ConfigError) as error:
        MODEL.replace(transformer_impl="te").validate()
    assert str(error.value) == ("model.transformer_impl='te': choose one of transformer_engine, "
                                "local")


def test_transformer_impl_picks_the_spec_on_cuda_and_cpu_always_builds_local():
    def core_attention(backend, impl):
        spec = specs.stack_spec(backend, [3], MIXER, transformer_impl=impl)
        return spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention

    assert core_attention("cuda", "transformer_engine") is te.TEDotProductAttention
    for backend, impl in [("cuda", "local"), ("cpu", "local"), ("cpu", "transformer_engine")]:
        assert core_attention(backend, impl) is specs.SDPAttention, (backend, impl)
        local = specs.stack_spec(backend, [3], MIXER, transformer_impl=impl)
        assert local.params["final_norm"] is specs.TorchRMSNorm


# -- checkpoint keys ----------------------------------------------------------------------------

class LayerNormColumnParallelLinear(mcore.ColumnParallelLinear):
    """TELayerNormColumnParallelLinear's parameters: the linear's ``weight`` and its fused
    input norm's ``layer_norm_weight`` (RMSNorm: no norm bias)."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))


TE_STAND_INS = {
    id(te.TELayerNormColumnParallelLinear): LayerNormColumnParallelLinear,
    id(te.TERowParallelLinear): mcore.RowParallelLinear,
    id(te.TEDotProductAttention): specs.SDPAttention,  # no state unless a learnable softmax
    id(te.TENorm): specs.TorchRMSNorm,
}


def with_stand_ins(spec):
    """``spec`` with each Transformer Engine module (a MagicMock without TE) replaced by its
    stand-in; every other module, name and key map stays Megatron-Core's."""
    if id(spec) in TE_STAND_INS:
        return TE_STAND_INS[id(spec)]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: with_stand_ins(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    if isinstance(spec, dict):
        return {name: with_stand_ins(value) for name, value in spec.items()}
    return spec


def checkpoint_keys(transformer_impl: str) -> set[str]:
    real_stack_spec = specs.stack_spec

    def stack_spec(*args, **kwargs):
        return with_stand_ins(real_stack_spec(*args, **kwargs))

    with mock.patch.object(specs, "stack_spec", stack_spec):
        model = build.build_model(MODEL.replace(transformer_impl=transformer_impl),
                                  build.ModelLayout(), backend="cuda")
    return {entry.key for entry in nested_values(model.sharded_state_dict())}


@pytest.fixture
def one_process_groups():
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    process_groups.seed_everything(0)
    yield
    process_groups.destroy_distributed()


def test_local_spec_saves_the_checkpoint_keys_of_the_transformer_engine_spec(one_process_groups):
    """Both models are built from their real specs: the local one as training builds it, the
    Transformer Engine one from Megatron-Core's ``mamba_stack_spec`` (its layer classes,
    submodule names and key maps) with each TE module, which cannot be built without TE,
    replaced by a stand-in owning the parameters that TE module owns (``TE_STAND_INS``; TE's
    DotProductAttention saves nothing unless its softmax is learnable). The sharded keys,
    ``_extra_state`` objects included, must be equal: the keys are what a checkpoint is read
    by, so a checkpoint moves between the two implementations both ways. Not covered here:
    the contents of TE's ``_extra_state`` (FP8 metadata) and TE's grouped-GEMM MoE experts,
    which need a GPU (the MoE norm's name is checked from the spec below)."""
    local, transformer_engine = checkpoint_keys("local"), checkpoint_keys("transformer_engine")
    assert local == transformer_engine, (local ^ transformer_engine)
    fused_norms = {key for key in local if key.endswith("layer_norm_weight")}
    assert fused_norms == {"decoder.layers.0.mixer.in_proj.layer_norm_weight",
                           "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
                           "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"}


def test_moe_layer_norm_keeps_the_name_of_the_transformer_engine_spec():
    """Megatron-Core's TE spec builds the MoE layer's norm as a TENorm of its own (not fused
    into a linear): the local MoE layer must save it under the same name."""
    te_layer = specs.te_stack_submodules(MIXER).moe_layer.submodules
    local_layer = specs.local_stack_submodules(MIXER).moe_layer.submodules
    assert te_layer.pre_mlp_layernorm is te.TENorm and not te_layer.sharded_state_dict_keys_map
    assert not any("pre_mlp_layernorm.weight".startswith(prefix)
                   for prefix in local_layer.sharded_state_dict_keys_map)


# -- full recompute -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend, impl", [("cpu", "local"), ("cuda", "local"),
                                           ("cuda", "transformer_engine")])
def test_full_recompute_covers_every_layer_class_of_every_spec(backend, impl):
    submodules = specs.stack_spec(backend, [3], MIXER, transformer_impl=impl).submodules
    recomputed = stack.recomputed_layers(submodules)
    for slot in LAYER_SLOTS:
        original, replaced = getattr(submodules, slot).module, getattr(recomputed, slot).module
        assert issubclass(replaced, stack.RecomputedLayer), (slot, replaced)
        assert issubclass(replaced, original) and replaced is not original, (slot, replaced)
    if impl == "transformer_engine":  # the classes the old two-entry table missed
        assert submodules.mlp_layer.module is mcore.MLPLayer
        assert submodules.moe_layer.module is mcore.MoETransformerLayer


def test_full_recompute_builds_recomputed_layers_with_the_same_gradients(one_process_groups):
    gradients = {}
    for recompute in ("none", "full"):
        process_groups.seed_everything(0)
        model = build.build_model(MODEL, build.ModelLayout(recompute=recompute), backend="cpu")
        tokens = torch.arange(MODEL.seq_length).remainder(MODEL.vocab_size).view(1, -1)
        model(tokens, torch.arange(MODEL.seq_length).view(1, -1), None, labels=tokens).sum(
            ).backward()
        gradients[recompute] = {name: p.grad for name, p in model.named_parameters()}
        recomputed = [isinstance(layer, stack.RecomputedLayer) for layer in model.decoder.layers]
        assert recomputed == [recompute == "full"] * MODEL.num_layers
    for name, gradient in gradients["none"].items():
        torch.testing.assert_close(gradients["full"][name], gradient, rtol=0, atol=0, msg=name)


def test_a_layer_class_without_a_recomputed_class_is_refused():
    submodules = specs.local_stack_submodules(MIXER)
    unknown = dataclasses.replace(submodules, mlp_layer=dataclasses.replace(
        submodules.mlp_layer, module=torch.nn.Identity))
    with pytest.raises(TypeError, match="mlp_layer: no recomputed class for Identity"):
        stack.recomputed_layers(unknown)


class Doubling(torch.nn.Module):
    """A layer: ``2 * hidden``."""

    def __init__(self, config, *, pg_collection):
        super().__init__()
        self.config = config

    def forward(self, hidden_states):
        return 2 * hidden_states


class RecomputedDoubling(stack.RecomputedLayer, Doubling):
    pass


@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_full_recompute_runs_in_fp8_through_transformer_engine(fp8):
    """FP8 layers are recomputed by Transformer Engine's checkpoint (FP8 as in the forward),
    others by Megatron-Core's. TE's function is a mock (it needs TE and a GPU) that checks
    what it is given and runs the layer."""
    layer = RecomputedDoubling(SimpleNamespace(fp8=fp8),
                               pg_collection=SimpleNamespace(tp="tensor-parallel group"))
    hidden = torch.ones(3, requires_grad=True)

    def te_checkpoint(function, distribute_saved_activations, get_rng_tracker, tp_group, *args):
        assert get_rng_tracker is mcore.tensor_parallel.get_cuda_rng_tracker
        assert (distribute_saved_activations, tp_group) == (False, "tensor-parallel group")
        return function(*args)

    with mock.patch.object(mcore, "te_checkpoint", side_effect=te_checkpoint) as fp8_checkpoint, \
         mock.patch.object(mcore.tensor_parallel, "checkpoint",
                           wraps=mcore.tensor_parallel.checkpoint) as bf16_checkpoint:
        out = layer(hidden)
    out.sum().backward()
    assert torch.equal(out, 2 * torch.ones(3)) and torch.equal(hidden.grad, 2 * torch.ones(3))
    assert (fp8_checkpoint.call_count, bf16_checkpoint.call_count) == ((1, 0) if fp8 else (0, 1))
    with torch.no_grad():  # nothing to recompute without a backward
        layer(hidden)
    assert fp8_checkpoint.call_count + bf16_checkpoint.call_count == 1
