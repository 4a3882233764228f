import subprocess
import sys

import pytest

from megatron_hybrid.model import flavors
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.model.flavors import FLAVORS, get_flavor
from megatron_hybrid.pattern import parse

SHAPE_FIELDS = (
    "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "seq_length",
)

# The published reference shapes ("Model shapes"): layers, then SHAPE_FIELDS in order.
PUBLISHED = {
    "nemotron-h-4b": (52, 3072, 12288, 32, 8, 128, 112, 64, 128, 8, 8192),
    "nemotron-h-8b": (52, 4096, 21504, 32, 8, 128, 128, 64, 128, 8, 8192),
    "nemotron-h-47b": (98, 8192, 30720, 64, 8, 128, 256, 64, 256, 8, 8192),
    "nemotron-h-56b": (118, 8192, 32768, 64, 8, 128, 256, 64, 256, 8, 8192),
    "nano-v2-12b": (62, 5120, 20480, 40, 8, 128, 128, 80, 128, 8, 131072),
    "nano-v2-9b": (56, 4480, 15680, 40, 8, 128, 128, 80, 128, 8, 131072),
    "nemotron-3-nano-30b-a3b": (52, 2688, 1856, 32, 2, 128, 64, 64, 128, 8, 262144),
}

# REFERENCE.md, "Patterns", written out symbol by symbol.
PUBLISHED_PATTERNS = {
    "nemotron-h-4b": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "nemotron-h-8b": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "nemotron-h-47b": "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M"
                      "---MM---M-M*-M-M-M-M-M-",
    "nano-v2-12b": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "nano-v2-9b": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
    "nemotron-3-nano-30b-a3b": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
}

# HF nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json: n_routed_experts,
# num_experts_per_tok, moe_intermediate_size, moe_shared_expert_intermediate_size,
# routed_scaling_factor (n_group 1, topk_group 1, norm_topk_prob true: one group, normalized).
NEMOTRON_3_NANO_MOE = {"num_moe_experts": 128, "moe_router_topk": 6, "moe_ffn_hidden_size": 1856,
                       "moe_shared_expert_intermediate_size": 3712,
                       "moe_router_topk_scaling_factor": 2.5,
                       "moe_router_score_function": "sigmoid",
                       "moe_router_enable_expert_bias": True}


def is_subsequence(short: str, long: str) -> bool:
    remaining = iter(long)
    return all(symbol in remaining for symbol in short)


@pytest.mark.parametrize("name", FLAVORS)
def test_every_flavor_builds_a_valid_config(name):
    cfg = get_flavor(name)
    assert isinstance(cfg, ModelConfig)
    cfg.validate()
    assert cfg.num_layers == parse(cfg.pattern).num_layers
    assert cfg.seq_length % cfg.mamba_chunk_size == 0
    assert {"M", "*"} <= set(cfg.pattern) and {"-", "E"} & set(cfg.pattern)


def test_factories_are_named_functions_returning_fresh_configs():
    for name, factory in FLAVORS.items():
        assert factory.__name__ != "<lambda>" and factory.__doc__, name
    assert get_flavor("nano-v2-12b") is not get_flavor("nano-v2-12b")


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_shapes(name):
    cfg = get_flavor(name)
    layers, *shape = PUBLISHED[name]
    assert cfg.num_layers == len(cfg.pattern) == layers
    assert dict(zip(SHAPE_FIELDS, shape)) == {f: getattr(cfg, f) for f in SHAPE_FIELDS}
    assert cfg.vocab_size == 131072
    assert (cfg.norm_eps, cfg.mamba_chunk_size) == (1e-5, 128)


@pytest.mark.parametrize("name", PUBLISHED_PATTERNS)
def test_published_patterns(name):
    assert get_flavor(name).pattern == PUBLISHED_PATTERNS[name]


@pytest.mark.parametrize("name", ["nemotron-3-nano-30b-a3b", "nemotron-3-nano-30b-a3b-base"])
def test_nemotron_3_nano_moe_is_the_published_one(name):
    cfg = get_flavor(name)
    assert {key: getattr(cfg, key) for key in NEMOTRON_3_NANO_MOE} == NEMOTRON_3_NANO_MOE
    assert parse(cfg.pattern).counts == {"M": 23, "E": 23, "*": 6, "-": 0, "H": 0}
    assert cfg == get_flavor("nemotron-3-nano-30b-a3b")  # the base: the same architecture


def test_56b_pattern_as_described():
    text = get_flavor("nemotron-h-56b").pattern
    assert len(text) == 118
    assert text.startswith("M-M-M-M*-M-M-M-M-M*") and text.endswith("-M-M-M-M-M-")
    middle = text[len("M-M-M-M*-M-M-M-M-M*"):-len("-M-M-M-M-M-")]
    assert middle == "-M-M-M-M-M*" * 8


def test_nano_v2_12b_to_9b_published_relation():
    big, small = get_flavor("nano-v2-12b"), get_flavor("nano-v2-9b")
    assert (big.hidden_size, small.hidden_size) == (5120, 4480)
    assert (big.ffn_hidden_size, small.ffn_hidden_size) == (20480, 15680)
    assert (big.num_layers, small.num_layers) == (62, 56)
    big_counts, small_counts = parse(big.pattern).counts, parse(small.pattern).counts
    dropped = {kind: big_counts[kind] - small_counts[kind] for kind in big_counts}
    assert dropped == {"*": 2, "M": 1, "-": 3, "E": 0, "H": 0}
    assert is_subsequence(small.pattern, big.pattern)
    for field in ("num_attention_heads", "num_query_groups", "kv_channels", "mamba_num_heads",
                  "mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
        assert getattr(small, field) == getattr(big, field), field


def test_tiny_nano_v2_9b_mirrors_minitron_pruning_of_tiny_12b():
    big, small = get_flavor("tiny-nano-v2-12b"), get_flavor("tiny-nano-v2-9b")
    # Widths scaled by the published ratios exactly.
    assert small.hidden_size == big.hidden_size * 4480 // 5120
    assert small.ffn_hidden_size == big.ffn_hidden_size * 15680 // 20480
    assert small.hidden_size % 8 == 0 and small.ffn_hidden_size % 8 == 0
    # Everything but width and depth unchanged, as in the published pruning.
    width_and_depth = {"pattern", "hidden_size", "ffn_hidden_size"}
    unchanged = set(big.to_dict()) - width_and_depth
    assert {f: getattr(small, f) for f in unchanged} == {f: getattr(big, f) for f in unchanged}
    # Depth: a subsequence, dropping attention, Mamba and MLP layers with MLP drops >= Mamba's.
    assert is_subsequence(small.pattern, big.pattern)
    assert small.pattern == parse(big.pattern).drop_layers(
        flavors.TINY_NANO_V2_9B_DROPPED_LAYERS).text
    big_counts, small_counts = parse(big.pattern).counts, parse(small.pattern).counts
    dropped = {kind: big_counts[kind] - small_counts[kind] for kind in big_counts}
    assert dropped == {"*": 1, "M": 1, "-": 2, "E": 0, "H": 0}
    assert small_counts["*"] / big_counts["*"] == 4 / 6  # published keeps 4 of 6 attention


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_flavors_clamp_dt_with_their_hf_configs_time_step_min(name):
    # Every published config.json has time_step_min 0.001, which HF's mixer uses as the clamp.
    from megatron_hybrid import backends

    backends.install("cpu")
    from megatron_hybrid.model.hf_mapping import hf_config_from_model

    cfg = get_flavor(name)
    assert cfg.mamba_dt_clamp_min == 0.001
    hf = hf_config_from_model(cfg)
    assert hf.time_step_min == 0.001 and tuple(hf.time_step_limit) == (0.001, float("inf"))


def test_tiny_flavors_are_cpu_sized():
    for name in FLAVORS:
        if name.startswith("tiny"):
            cfg = get_flavor(name)
            assert 64 <= cfg.hidden_size <= 128, name
            assert 512 <= cfg.vocab_size <= 1024, name
            assert cfg.seq_length == 256 and cfg.mamba_chunk_size in (32, 64), name


def test_each_published_flavor_has_a_tiny_twin_with_its_symbols():
    for name in PUBLISHED:
        tiny = get_flavor(f"tiny-{name}")
        assert set(tiny.layer_pattern.layers) == set(get_flavor(name).layer_pattern.layers), name


def test_tiny_alias():
    assert get_flavor("tiny") == get_flavor("tiny-hybrid")
    assert get_flavor("tiny").num_layers <= 8


def test_unknown_flavor_lists_names_and_suggests():
    with pytest.raises(ValueError) as err:
        get_flavor("nano-v2-12")
    message = str(err.value)
    assert "\n" not in message
    assert "did you mean 'nano-v2-12b'?" in message
    assert all(name in message for name in FLAVORS)
    with pytest.raises(ValueError, match="known flavors are nemotron-h-4b"):
        get_flavor("gpt")


def test_pattern_and_flavors_do_not_import_torch():
    code = "import sys, megatron_hybrid.model.flavors; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
