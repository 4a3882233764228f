"""Parameter counts of every flavor: our Megatron-Core model vs HF NemotronH, built on meta."""

import time

import psutil
import pytest

from megatron_hybrid import backends

backends.install("cpu")

from megatron_hybrid import mcore  # noqa: E402
from megatron_hybrid.model.flavors import FLAVORS, get_flavor  # noqa: E402
from megatron_hybrid.model.params import (  # noqa: E402
    KIND_KEYS,
    count_parameters,
    hf_parameter_counts,
)
from megatron_hybrid.parallel import process_groups
from megatron_hybrid.pattern import describe  # noqa: E402

NANO_V2_12B_PARAMETERS = 12_310_001_152
"""HF NemotronHForCausalLM's count for the NVIDIA-Nemotron-Nano-12B-v2-Base config."""
NEMOTRON_3_NANO_PUBLISHED = {"total": 31.6e9, "active_without_embedding": 3.2e9,
                             "active": 3.6e9}
"""Nemotron 3 Nano 30B-A3B's model card: 31.6B total, 3.2B active (3.6B with embeddings), to
the 0.1B it rounds to."""


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    """One 1-process gloo group for the module (count_parameters would start one per call)."""
    started = not mcore.parallel_state.model_parallel_is_initialized()
    if started:
        process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    yield
    if started:
        process_groups.destroy_distributed()


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_count_matches_hf(name):
    cfg = get_flavor(name)
    counts = count_parameters(cfg)
    assert {key: counts[key] for key in ("total", "active")} == hf_parameter_counts(cfg)
    assert (counts["active"] < counts["total"]) == bool(cfg.num_moe_experts)
    parts = ("embedding", "output_layer", "final_norm", *KIND_KEYS.values())
    assert sum(counts[key] for key in parts) == counts["total"]
    assert len(counts["per_layer"]) == cfg.num_layers
    assert sum(counts["per_layer"]) == sum(counts[key] for key in KIND_KEYS.values())
    for symbol, key in KIND_KEYS.items():
        assert (counts[key] > 0) == (symbol in cfg.layer_pattern.layers)
    assert counts["embedding"] == counts["output_layer"] == cfg.vocab_size * cfg.hidden_size
    assert counts["final_norm"] == cfg.hidden_size


def test_nano_v2_12b_is_the_published_count_and_builds_without_memory():
    process = psutil.Process()
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    counts = count_parameters(get_flavor("nano-v2-12b"))
    seconds = time.perf_counter() - start
    rss_grown = process.memory_info().rss - rss_before
    assert counts["total"] == NANO_V2_12B_PARAMETERS
    # fp32 weights would be 49 GB; the meta build must not allocate them (measured: < 10 MB).
    assert rss_grown < 256 * 2**20, f"meta build grew RSS by {rss_grown / 2**20:.0f} MB"
    assert seconds < 10, f"meta build of the 12B took {seconds:.1f} s"


def test_nemotron_3_nano_counts_are_the_published_ones():
    counts = count_parameters(get_flavor("nemotron-3-nano-30b-a3b"))
    for key, published in NEMOTRON_3_NANO_PUBLISHED.items():
        assert abs(counts[key] - published) <= 0.05e9, (key, counts[key])
    # Measured: 31,577,937,344 total, 3,580,073,408 active, 3,227,751,872 without embedding.
    assert counts["active"] - counts["active_without_embedding"] == counts["embedding"]


def test_per_layer_counts_feed_the_pattern_description():
    cfg = get_flavor("tiny-hybrid")
    counts = count_parameters(cfg)
    text = describe(cfg.layer_pattern, params_per_layer=counts["per_layer"])
    assert "decoder layers: " in text
    mamba, mlp, attention = (counts["per_layer"][cfg.layer_pattern.layers.index(s)]
                             for s in "M-*")
    d_inner, groups_state = cfg.mamba_d_inner, 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
    conv_dim = d_inner + groups_state
    assert mamba == (cfg.hidden_size  # pre-norm
                     + cfg.hidden_size * (2 * d_inner + groups_state + cfg.mamba_num_heads)
                     + conv_dim * 4 + conv_dim  # conv1d weight + bias
                     + 3 * cfg.mamba_num_heads  # dt_bias, A_log, D
                     + d_inner  # gated norm
                     + d_inner * cfg.hidden_size)  # out_proj
    assert mlp == cfg.hidden_size + 2 * cfg.hidden_size * cfg.ffn_hidden_size
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    assert attention == (cfg.hidden_size + qkv_rows * cfg.hidden_size
                         + cfg.num_attention_heads * cfg.kv_channels * cfg.hidden_size)
