"""Heterogeneous blocks (``model.layer_overrides``): per-layer FFN widths and attention / Mamba
head counts, as Puzzle's and MiniPuzzle's searches leave them.

- bad overrides are refused in one line that names the key;
- the overrides round-trip through recipe overrides (both spellings), the run header's
  non-default values, the resolved YAML and meta.json (JSON keys the layer indices as text);
- each layer is built at its own sizes: its parameters are those of the same layer in a
  model with those sizes everywhere, and the planner's formulas count the same total;
- saved at TP=1, the model loads at TP=2 with the same logits and at PP=2 with every layer's
  tensors (the stages' layers numbered globally, whatever their kind);
- Megatron-Core's dynamic engine decodes per-layer widths and query heads as the uncached
  loop does, and refuses per-layer KV groups and Mamba heads in one line; HF export refuses
  per-layer sizes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rank_environment
from test_params import model_parallel  # noqa: F401  (autouse: one gloo group here too)

from megatron_hybrid import backends

backends.install("cpu")

from megatron_hybrid import mcore, recipe, sections  # noqa: E402
from megatron_hybrid.errors import ConfigError  # noqa: E402
from megatron_hybrid.inference.engine import check_decode_layout  # noqa: E402
from megatron_hybrid.model.config import ModelConfig  # noqa: E402
from megatron_hybrid.model.hf_mapping import ConversionError, hf_config_from_model  # noqa: E402
from megatron_hybrid.model.params import build_on_meta, count_parameters  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402
from megatron_hybrid.planning import planner  # noqa: E402

WORKER = Path(__file__).parents[1] / "workers" / "heterogeneous_reshard.py"
TINY_RECIPE = str(Path(__file__).parents[2] / "recipes" / "tiny" / "pretrain.yaml")
OVERRIDES = {1: {"ffn_hidden_size": 48}, 2: {"num_attention_heads": 4, "num_query_groups": 4},
             3: {"mamba_num_heads": 4}, 5: {"moe_ffn_hidden_size": 16}}


def tiny(overrides: dict) -> ModelConfig:
    """Every layer kind (layers: 0 M, 1 -, 2 *, 3 M, 4 -, 5 E)."""
    return ModelConfig(
        pattern="M-*M-E", hidden_size=32, ffn_hidden_size=64, num_attention_heads=8,
        num_query_groups=2, kv_channels=8, mamba_num_heads=8, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=2, vocab_size=64, seq_length=32,
        mamba_chunk_size=16, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
        layer_overrides=overrides)


@pytest.mark.parametrize("overrides, expected", [
    ({6: {"ffn_hidden_size": 32}},
     "model.layer_overrides.6: not a layer of the pattern: give a 0-based index in 0..5 "
     "('|' not counted)"),
    ({"first": {"ffn_hidden_size": 32}}, "model.layer_overrides.first: not a layer"),
    ({0: {"ffn_hidden_size": 32}},
     "model.layer_overrides.0.ffn_hidden_size: layer 0 is Mamba-2 ('M'), whose per-layer "
     "sizes are ['mamba_num_heads']"),
    ({2: {"kv_channels": 4}}, "layer 2 is attention ('*'), whose per-layer sizes are "
                              "['num_attention_heads', 'num_query_groups']"),
    ({1: {"ffn_hidden_size": 0}},
     "model.layer_overrides.1.ffn_hidden_size must be a positive integer, got 0"),
    ({1: {}}, "model.layer_overrides.1: expected a mapping of sizes from ['ffn_hidden_size']"),
    ({2: {"num_query_groups": 3}},
     "model.layer_overrides.2: model.num_attention_heads (8) must be a multiple of "
     "model.num_query_groups (3)"),
    ({3: {"mamba_num_heads": 5}},
     "model.layer_overrides.3: model.mamba_num_heads (5) must be a multiple of "
     "model.mamba_num_groups (2)"),
])
def test_bad_layer_overrides_are_refused_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as error:
        tiny(overrides).validate()
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_plan_keeps_each_layers_activations_at_its_own_sizes():
    layout = planner.TrainingLayout(seq_length=32, micro_batch_size=2)

    def plan(cfg):
        memory = planner.training_memory(cfg, layout)
        return memory.activations, memory.transient

    # the pattern's MLP layers are 1 and 4: both narrowed plan as the narrow model does
    narrow, wide = tiny({}).replace(ffn_hidden_size=16), tiny({})
    both = {1: {"ffn_hidden_size": 16}, 4: {"ffn_hidden_size": 16}}
    assert plan(tiny(both)) == plan(narrow) != plan(wide)
    mixed, _ = plan(tiny({1: {"ffn_hidden_size": 16}}))  # one of each: halfway
    assert mixed["mlp"] == pytest.approx((plan(narrow)[0]["mlp"] + plan(wide)[0]["mlp"]) / 2)
    assert mixed["mamba"] == plan(wide)[0]["mamba"]


def test_a_layers_own_heads_must_split_over_tensor_parallel():
    # the recipe's layer 7 is attention, with 8 heads in 2 groups elsewhere
    three_heads = ["model.layer_overrides={7: {num_attention_heads: 3, num_query_groups: 1}}"]
    recipe.load_recipe(TINY_RECIPE, [*three_heads, "parallel.tp=1"]).validate(1)
    recipe.load_recipe(TINY_RECIPE, ["parallel.tp=2"]).validate(2)
    with pytest.raises(ConfigError) as error:
        recipe.load_recipe(TINY_RECIPE, [*three_heads, "parallel.tp=2"]).validate(2)
    assert str(error.value).startswith(
        "parallel.tp=2 does not divide the num_attention_heads (3) of layer 7 "
        "(model.layer_overrides.7)") and "\n" not in str(error.value)


def test_overrides_round_trip_through_recipes_yaml_and_meta_json(tmp_path):
    flow = recipe.load_recipe(TINY_RECIPE, ["model.layer_overrides={1: {ffn_hidden_size: 256}}"])
    dotted = recipe.load_recipe(TINY_RECIPE, ["model.layer_overrides.1.ffn_hidden_size=256"])
    assert flow.model.layer_overrides == dotted.model.layer_overrides == {
        1: {"ffn_hidden_size": 256}}
    assert flow == dotted
    flow.validate()
    printed = dict(recipe.non_default_items(flow))["model.layer_overrides"]  # run header
    assert printed == {1: {"ffn_hidden_size": 256}}
    assert recipe.load_recipe(TINY_RECIPE, [f"model.layer_overrides={printed}"]) == flow
    resolved = sections.save_resolved(flow, tmp_path / "config.yaml")
    assert recipe.load_recipe(resolved) == flow
    meta = json.loads(json.dumps(flow.model.to_dict()))
    assert meta["layer_overrides"] == {"1": {"ffn_hidden_size": 256}}
    assert ModelConfig(**meta) == flow.model


def test_each_layer_is_built_and_counted_at_its_own_sizes():
    cfg = tiny(OVERRIDES)
    cfg.validate()
    counts = count_parameters(cfg)
    uniform = count_parameters(cfg.replace(layer_overrides={}))["per_layer"]
    for index, parameters in enumerate(counts["per_layer"]):
        assert parameters == count_parameters(cfg.for_layer(index))["per_layer"][index]
        assert (parameters != uniform[index]) == (index in OVERRIDES)
    assert planner.total_parameters(cfg) == counts["total"]
    assert planner.active_parameters(cfg) == counts["active"]
    layers = build_on_meta(cfg).decoder.layers
    assert layers[1].mlp.linear_fc1.weight.shape == (48, 32)
    assert layers[2].self_attention.linear_qkv.weight.shape == ((4 + 2 * 4) * 8, 32)
    assert layers[3].mixer.nheads == 4 and layers[0].mixer.nheads == 8
    assert layers[5].mlp.experts.local_experts[0].linear_fc1.weight.shape == (16, 32)


def test_saved_at_tp1_loads_at_tp2_and_pp2(tmp_path):
    out = tmp_path / "results.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(WORKER), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=rank_environment(2))
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(out, weights_only=True)
    torch.testing.assert_close(results["logits"]["tp2"], results["logits"]["tp1"],
                               rtol=1e-5, atol=1e-5)
    assert results["pp2_numbers"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert results["pp2_layers_equal"]


def test_hf_export_and_the_dynamic_engine_refuse_what_they_cannot_hold():
    with pytest.raises(ConversionError, match=r"model.layer_overrides \(layers \[1, 2, 3, 5\]\)"
                                              r": HF NemotronH has one size per layer kind"):
        hf_config_from_model(tiny(OVERRIDES))
    check_decode_layout(build_on_meta(tiny({1: {"ffn_hidden_size": 48}})))  # caches alike
    for index, sizes in [(2, {"num_query_groups": 4}), (3, {"mamba_num_heads": 4})]:
        with pytest.raises(ConfigError, match=f"layer {index} has its own {next(iter(sizes))}"):
            check_decode_layout(build_on_meta(tiny({index: sizes})))


def test_per_layer_widths_and_query_heads_decode_on_the_dynamic_engine():
    from megatron_hybrid.inference.engine import generate_cached
    from megatron_hybrid.inference.generate import generate_batch
    from megatron_hybrid.model.build import ModelLayout, build_model

    process_groups.seed_everything(0)
    model = build_model(tiny({1: {"ffn_hidden_size": 48}, 2: {"num_attention_heads": 4},
                              5: {"moe_ffn_hidden_size": 16}}), ModelLayout(), backend="cpu")
    prompts = [list(range(3, 20)), [7, 1, 60]]
    assert generate_cached(model, prompts, 6) == generate_batch(model, prompts, 6)
