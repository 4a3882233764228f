"""MoE (`E` layers) between HF ``NemotronHForCausalLM`` and our Megatron-Core model.

The tiny twin of Nemotron 3 Nano (8 routed experts of which 2 are active, a shared expert,
sigmoid router with an expert bias and scaling 2.5) with the published dt clamp
(``time_step_min=0.001``), as HF's random fp32 model (HF's own torch code, see
test_hf_parity.py): converted into our model it gives HF's logits, and the expert bias moves
the choice (dropping it changes the logits). ``convert hf-to-mcore`` of the directory
transformers' ``save_pretrained`` writes (one tensor per expert, several shards) gives what
Megatron-Core's ``save_weights`` writes for our converted model (router bias buffers
included), and ``convert mcore-to-hf`` back gives the same bytes; that ``save_weights``
checkpoint taken to HF and back gives the same tensors; a file holding transformers' stacked
3-D expert tensors imports to the same checkpoint. MoE routers HF NemotronH does not have are
refused in one line.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_convert_tools import hf_tensors, raw_bytes, write_tokenizer
from test_hf_parity import (
    TOLERANCE,
    build_hf,
    hf_logits_and_loss,
    ids,
    load_hf_torch_reference,
    megatron_logits_and_loss,
    model_parallel,  # noqa: F401  (the one-process groups, for this module too)
    random_tensor,
)

from megatron_hybrid import backends

backends.install("cpu")

from megatron_hybrid import cli  # noqa: E402
from megatron_hybrid.checkpoint import dist_checkpoint, sharded_io  # noqa: E402
from megatron_hybrid.model import hf_mapping  # noqa: E402
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.model.config import ModelConfig  # noqa: E402
from megatron_hybrid.model.flavors import PUBLISHED_TIME_STEP_MIN, get_flavor  # noqa: E402

FLAVOR = "tiny-nemotron-3-nano-30b-a3b"
MOE_LAYER = 1  # the first E of the pattern "MEMEM*EMEMEMEME"


@pytest.fixture(scope="module")
def flavor():
    return get_flavor(FLAVOR).replace(mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN)


@pytest.fixture(scope="module")
def hf_module():
    return load_hf_torch_reference()


@pytest.fixture(scope="module")
def hf_config(flavor):
    return hf_mapping.hf_config_from_model(flavor)


@pytest.fixture(scope="module")
def cfg(hf_config):
    return hf_mapping.model_config_from_hf(hf_config)


@pytest.fixture(scope="module")
def hf_weights(hf_module, hf_config):
    """transformers' state dict (stacked experts) of random weights with O(1) activations; the
    expert bias is random too, as training leaves it."""
    shapes = {k: v.shape for k, v in build_hf(hf_module, hf_config, None).state_dict().items()}
    generator = torch.Generator().manual_seed(1234)
    return {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def reference(hf_module, hf_config, hf_weights):
    return build_hf(hf_module, hf_config, hf_weights).eval()


@pytest.fixture(scope="module")
def hf_logits(reference):
    with torch.no_grad():
        return hf_logits_and_loss(reference, ids())[0]


def megatron_model(cfg: ModelConfig, state: dict):
    model = build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False)
    hf_mapping.load_mcore_state_dict(model, state)
    return model.eval()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return megatron_logits_and_loss(model, ids())[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def converted(cfg, hf_weights):
    """Our model of the imported config (router in fp32, as HF computes it)."""
    return megatron_model(cfg, hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg))


# --- the mapping -----------------------------------------------------------------------------

def test_megatron_moe_tensors_are_the_mapped_ones(cfg, converted):
    """Every tensor of an E layer in our model's state dict (router bias included; the
    router's token count is no state) has an entry in the weight table."""
    layer = f"decoder.layers.{MOE_LAYER}."
    ours = {name for name in converted.state_dict() if name.startswith(layer)
            and not name.endswith("._extra_state")}
    mapped = {entry.mcore for entry in hf_mapping.weight_map(cfg) if entry.layer == MOE_LAYER}
    assert ours == mapped and len(ours) == 5 + 2 * cfg.num_moe_experts
    router = converted.decoder.layers[MOE_LAYER].mlp.router
    assert f"{layer}mlp.router.expert_bias" in ours and router.expert_bias.dtype == torch.float32
    assert not any("local_tokens_per_expert" in name for name in converted.state_dict())


def test_config_round_trip_keeps_the_router(flavor, hf_config, cfg):
    assert (hf_config.n_routed_experts, hf_config.num_experts_per_tok) == (8, 2)
    assert (hf_config.routed_scaling_factor, hf_config.norm_topk_prob) == (2.5, True)
    assert hf_config.moe_shared_expert_intermediate_size == 64
    # HF's router runs in fp32 whatever the model's dtype; the flavor trains it in fp64.
    assert cfg == flavor.replace(pattern=flavor.layer_pattern.layers, moe_router_dtype="fp32")


def test_state_dict_round_trips_are_identical(cfg, hf_weights, converted):
    assert hf_weights[f"model.layers.{MOE_LAYER}.mixer.experts.up_proj"].shape == (8, 32, 64)
    back = hf_mapping.mcore_to_hf_state_dict(hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg),
                                             cfg)
    assert back.keys() == hf_weights.keys()
    assert all(torch.equal(back[k], hf_weights[k]) for k in hf_weights)

    ours = {k: v for k, v in converted.state_dict().items() if not k.endswith("._extra_state")}
    published = hf_mapping.mcore_to_hf_state_dict(ours, cfg,
                                                  prefix=hf_mapping.HF_CHECKPOINT_PREFIX)
    expert = f"backbone.layers.{MOE_LAYER}.mixer.experts.7.down_proj.weight"
    assert published[expert].shape == (64, 32)
    assert not any(name.endswith("experts.up_proj") for name in published)
    again = hf_mapping.hf_to_mcore_state_dict(published, cfg)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


def test_a_lower_precision_expert_bias_is_upcast(cfg, hf_weights):
    name = f"model.layers.{MOE_LAYER}.mixer.gate.e_score_correction_bias"
    state = hf_mapping.hf_to_mcore_state_dict({**hf_weights, name: hf_weights[name].bfloat16()},
                                              cfg)
    bias = state[f"decoder.layers.{MOE_LAYER}.mlp.router.expert_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, hf_weights[name].bfloat16().float())


# --- parity ----------------------------------------------------------------------------------

def test_logits_match_hf(converted, hf_logits):
    diff = max_diff(logits_of(converted), hf_logits)
    print(f"\nMoE twin, fp32, time_step_min {PUBLISHED_TIME_STEP_MIN}: max |logits diff| = "
          f"{diff:.3g} (logits std {hf_logits.std().item():.3g})")
    assert hf_logits.std() > 0.5 and diff <= TOLERANCE


@pytest.fixture(scope="module")
def flavor_model(flavor, hf_weights):
    """Our model of the flavor's own config (router in fp64, as Nemotron 3 trains it)."""
    return megatron_model(flavor, hf_mapping.hf_to_mcore_state_dict(hf_weights, flavor))


def test_an_fp64_router_gives_the_same_logits_in_fp32(flavor, flavor_model, hf_logits):
    assert flavor.moe_router_dtype == "fp64"
    diff = max_diff(logits_of(flavor_model), hf_logits)
    print(f"\nrouter in fp64: max |logits diff| = {diff:.3g}")
    assert diff <= TOLERANCE


def swap_experts(state: dict, layer: int, a: int, b: int) -> dict:
    name = f"decoder.layers.{layer}.mlp.experts.local_experts.{{}}.linear_fc1.weight"
    return {**state, name.format(a): state[name.format(b)], name.format(b): state[name.format(a)]}


@pytest.mark.parametrize("mutation", ["expert bias dropped", "two experts' fc1 swapped"])
def test_a_wrong_mapping_is_detected(mutation, flavor, hf_weights, flavor_model, hf_logits):
    state = hf_mapping.hf_to_mcore_state_dict(hf_weights, flavor)
    bias = f"decoder.layers.{MOE_LAYER}.mlp.router.expert_bias"
    wrong = ({**state, bias: torch.zeros_like(state[bias])} if mutation == "expert bias dropped"
             else swap_experts(state, MOE_LAYER, 0, 5))
    hf_mapping.load_mcore_state_dict(flavor_model, wrong)
    try:
        diff = max_diff(logits_of(flavor_model), hf_logits)
    finally:
        hf_mapping.load_mcore_state_dict(flavor_model, state)
    print(f"\n{mutation}: max |logits diff| = {diff:.3g}")
    assert diff > 100 * TOLERANCE


# --- the convert command ----------------------------------------------------------------------

def convert(*argv) -> None:
    assert cli.main(["convert", *map(str, argv)]) == 0


@pytest.fixture(scope="module")
def round_trip(reference, tmp_path_factory):
    """transformers' save_pretrained (several shards) -> hf-to-mcore -> mcore-to-hf."""
    root = tmp_path_factory.mktemp("moe")
    size = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    reference.save_pretrained(root / "hf", max_shard_size=size // 3)
    write_tokenizer(root / "hf")
    convert("hf-to-mcore", root / "hf", root / "mcore")
    convert("mcore-to-hf", root / "mcore", root / "back", "--max-shard-size", size // 3)
    return root


def test_save_pretrained_writes_one_tensor_per_expert(round_trip):
    for directory in ("hf", "back"):
        names = hf_tensors(round_trip / directory)
        assert f"backbone.layers.{MOE_LAYER}.mixer.experts.7.up_proj.weight" in names
        assert not any(name.endswith(("experts.up_proj", "experts.down_proj")) for name in names)
        assert len(list((round_trip / directory).glob("model-*-of-*.safetensors"))) >= 3


def test_hf_to_mcore_to_hf_gives_the_same_bytes(round_trip):
    original, back = hf_tensors(round_trip / "hf"), hf_tensors(round_trip / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(raw_bytes(back[name]), raw_bytes(tensor)), name
    exported = json.loads((round_trip / "back" / "config.json").read_text())
    assert (exported["n_routed_experts"], exported["routed_scaling_factor"]) == (8, 2.5)
    assert exported["time_step_min"] == PUBLISHED_TIME_STEP_MIN


def checkpoint_tensors(directory, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in full and in its saved dtype."""
    with sharded_io.open_checkpoint(directory, cfg) as reader:
        return reader.load(list(reader.entries))


def tensor_index(directory) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(directory)).read_metadata().state_dict_metadata


def assert_same_tensors(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


TRAINED_AS = dict(moe_router_dtype="fp64", transformer_impl="local")
"""Settings of the saved checkpoint's config that no HF config carries."""


@pytest.fixture(scope="module")
def saved(round_trip, flavor, converted):
    """Our model of the HF weights saved by Megatron-Core's own save (router bias buffers
    included), with the imported checkpoint's meta.json but the flavor's config and
    TRAINED_AS (the same tensors)."""
    directory = round_trip / "saved"
    dist_checkpoint.save_weights([converted], directory)
    meta = dist_checkpoint.read_meta(round_trip / "mcore")
    meta["model"] = flavor.replace(**TRAINED_AS).to_dict()
    (directory / dist_checkpoint.META).write_text(json.dumps(meta))
    return directory


def test_imported_checkpoint_is_what_save_weights_writes(round_trip, cfg, saved):
    imported = checkpoint_tensors(round_trip / "mcore", cfg)
    assert f"decoder.layers.{MOE_LAYER}.mlp.router.expert_bias" in imported
    assert_same_tensors(imported, checkpoint_tensors(saved, cfg))
    assert tensor_index(round_trip / "mcore") == tensor_index(saved)
    assert dist_checkpoint.read_meta(round_trip / "mcore")["layout"]["ep"] == 1


def test_mcore_to_hf_to_mcore_gives_the_same_tensors(cfg, saved, tmp_path):
    convert("mcore-to-hf", saved, tmp_path / "hf")
    convert("hf-to-mcore", tmp_path / "hf", tmp_path / "again")
    again = ModelConfig(**dist_checkpoint.read_meta(tmp_path / "again")["model"])
    assert again == cfg and all(getattr(again, key) != value for key, value in TRAINED_AS.items())
    assert_same_tensors(checkpoint_tensors(tmp_path / "again", cfg), checkpoint_tensors(saved, cfg))
    assert tensor_index(tmp_path / "again") == tensor_index(saved)


def test_stacked_expert_files_import_alike(round_trip, cfg, hf_weights, tmp_path):
    """A safetensors file of transformers' state_dict (``model.``, 3-D experts) reads too."""
    (tmp_path / "hf").mkdir()
    save_file(hf_weights, str(tmp_path / "hf" / "model.safetensors"))
    shutil.copyfile(round_trip / "hf" / "config.json", tmp_path / "hf" / "config.json")
    convert("hf-to-mcore", tmp_path / "hf", tmp_path / "mcore")
    assert_same_tensors(checkpoint_tensors(tmp_path / "mcore", cfg),
                        checkpoint_tensors(round_trip / "mcore", cfg))


# --- what does not convert --------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False),
     "set model.moe_router_score_function=sigmoid, model.moe_router_enable_expert_bias=true"),
    (dict(moe_shared_expert_intermediate_size=None),
     "set model.moe_shared_expert_intermediate_size"),
    (dict(moe_router_enable_expert_bias=False), "set model.moe_router_enable_expert_bias=true"),
])
def test_megatron_routers_hf_lacks_are_refused_in_one_line(flavor, change, message):
    cfg = flavor.replace(**change)
    cfg.validate()
    for convert_it in (hf_mapping.hf_config_from_model, hf_mapping.weight_map):
        with pytest.raises(hf_mapping.ConversionError, match=message) as error:
            convert_it(cfg)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("change, message", [
    (dict(n_group=2, topk_group=1), r"expert groups \(n_group=2, topk_group=1; need 1 and 1\)"),
    (dict(moe_latent_size=32), "moe_latent_size=32 \\(latent expert projections\\)"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False with num_experts_per_tok=2"),
    (dict(num_nextn_predict_layers=1), "multi-token-prediction layers"),
])
def test_hf_moe_configs_that_cannot_convert_are_refused_in_one_line(hf_config, change, message):
    from transformers import NemotronHConfig

    bad = NemotronHConfig(**{**hf_config.to_dict(), **change})
    with pytest.raises(hf_mapping.ConversionError, match=message) as error:
        hf_mapping.model_config_from_hf(bad)
    assert "\n" not in str(error.value)
