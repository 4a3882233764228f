"""Named model flavors: published Nemotron-H / Nemotron Nano 2 / Nemotron 3 Nano shapes and
tiny CPU twins.

``FLAVORS`` maps a name to a factory returning a fresh ``ModelConfig``; ``get_flavor`` looks one
up. Published shapes follow Nemotron-H (arXiv 2504.03624), Nemotron Nano 2 (arXiv 2508.14444)
and NVIDIA's public Megatron-Bridge / NeMo 2 / HF ``NemotronHConfig`` configs.

Each ``tiny-<name>`` keeps its big flavor's structure at CPU size: the same repeating pattern
motif with fewer repeats, and widths scaled so that ratios (FFN / hidden, Mamba expand 2,
heads per group) match where small integers allow.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from megatron_hybrid import pattern as pattern_lib
from megatron_hybrid.model.config import ModelConfig

NEMOTRON_VOCAB_SIZE = 131072
PUBLISHED_TIME_STEP_MIN = 0.001
"""Every published config's ``time_step_min``: HF's mixer clamps dt from below with it, so the
published flavors do too (``mamba_dt_clamp_min``); the tiny twins keep Megatron-Core's default
(no clamp), on which their tests' training margins were measured."""

NEMOTRON_H_8B_PATTERN = "M-M-M-M*" + "-M-M-M-M-M*" * 3 + "-M-M-M-M-M-"
NEMOTRON_H_47B_PATTERN = (
    "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*"
    "-M-M-M-M-M-"
)
NEMOTRON_H_56B_PATTERN = "M-M-M-M*-M-M-M-M-M*" + "-M-M-M-M-M*" * 8 + "-M-M-M-M-M-"
NANO_V2_12B_PATTERN = "M-M-M-M*-" * 6 + "M-M-M-M-"
NANO_V2_9B_PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"

TINY_H_8B_PATTERN = "M-M-M-M*" + "-M-M-M-M-M*" + "-M-M-M-M-M-"
TINY_H_47B_PATTERN = "M-M-M-M*" + "-M---MM---M-M*" + "-M-M-M-"
TINY_H_56B_PATTERN = "M-M-M-M*-M-M-M-M-M*" + "-M-M-M-M-M*" + "-M-M-M-M-M-"
TINY_NANO_V2_12B_PATTERN = "M-M-M-M*-" * 2 + "|" + "M-M-M-M*-" + "M-M-M-M-"
"""35 layers do not split evenly, so ``|`` marks two pipeline stages (18 | 17 layers): the tiny
recipes run at pp=1 (marks ignored) and pp=2."""
TINY_NANO_V2_9B_DROPPED_LAYERS = (7, 8, 12, 13)
"""Layers of the tiny 12B pattern that depth pruning drops for the tiny 9B: 1 of 3 attention,
1 of 16 Mamba and 2 of 16 MLP layers, near the published 12B -> 9B proportions (2 of 6, 1 of 28,
3 of 28) and where it drops its first ones: the first attention layer with the MLP after it,
and a Mamba/MLP pair in the second motif."""
TINY_NANO_V2_9B_PATTERN = (
    pattern_lib.parse(TINY_NANO_V2_12B_PATTERN).drop_layers(TINY_NANO_V2_9B_DROPPED_LAYERS).text
)


def nemotron_h_4b() -> ModelConfig:
    """Nemotron-H-4B (arXiv 2504.03624; HF nvidia/Nemotron-H-4B-Base-8K config): the 8B layout
    at hidden 3072."""
    return ModelConfig(
        pattern=NEMOTRON_H_8B_PATTERN, hidden_size=3072, ffn_hidden_size=12288,
        num_attention_heads=32, num_query_groups=8, kv_channels=128,
        mamba_num_heads=112, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=8192,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


def nemotron_h_8b() -> ModelConfig:
    """Nemotron-H-8B (arXiv 2504.03624; HF nvidia/Nemotron-H-8B-Base-8K config)."""
    return ModelConfig(
        pattern=NEMOTRON_H_8B_PATTERN, hidden_size=4096, ffn_hidden_size=21504,
        num_attention_heads=32, num_query_groups=8, kv_channels=128,
        mamba_num_heads=128, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=8192,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


def nemotron_h_47b() -> ModelConfig:
    """Nemotron-H-47B (arXiv 2504.03624; HF nvidia/Nemotron-H-47B-Base-8K config)."""
    return ModelConfig(
        pattern=NEMOTRON_H_47B_PATTERN, hidden_size=8192, ffn_hidden_size=30720,
        num_attention_heads=64, num_query_groups=8, kv_channels=128,
        mamba_num_heads=256, mamba_head_dim=64, mamba_state_dim=256, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=8192,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


def nemotron_h_56b() -> ModelConfig:
    """Nemotron-H-56B (arXiv 2504.03624; HF nvidia/Nemotron-H-56B-Base-8K config)."""
    return ModelConfig(
        pattern=NEMOTRON_H_56B_PATTERN, hidden_size=8192, ffn_hidden_size=32768,
        num_attention_heads=64, num_query_groups=8, kv_channels=128,
        mamba_num_heads=256, mamba_head_dim=64, mamba_state_dim=256, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=8192,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


def nano_v2_12b() -> ModelConfig:
    """Nemotron Nano 2 12B base (arXiv 2508.14444; HF nvidia/NVIDIA-Nemotron-Nano-12B-v2-Base
    config)."""
    return ModelConfig(
        pattern=NANO_V2_12B_PATTERN, hidden_size=5120, ffn_hidden_size=20480,
        num_attention_heads=40, num_query_groups=8, kv_channels=128,
        mamba_num_heads=128, mamba_head_dim=80, mamba_state_dim=128, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=131072,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


def nano_v2_9b() -> ModelConfig:
    """Nemotron Nano 2 9B (arXiv 2508.14444; HF nvidia/NVIDIA-Nemotron-Nano-9B-v2 config):
    Minitron pruning of the 12B (hidden 5120 -> 4480, FFN 20480 -> 15680, 62 -> 56 layers)."""
    return ModelConfig(
        pattern=NANO_V2_9B_PATTERN, hidden_size=4480, ffn_hidden_size=15680,
        num_attention_heads=40, num_query_groups=8, kv_channels=128,
        mamba_num_heads=128, mamba_head_dim=80, mamba_state_dim=128, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=131072,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


NEMOTRON_3_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
"""52 layers: 23 Mamba-2, 23 MoE, 6 attention (HF ``hybrid_override_pattern``)."""
TINY_NEMOTRON_3_NANO_PATTERN = "MEMEM*EMEMEMEME"
"""Its head ``MEMEM*E``, one ``MEMEM*E`` motif reduced to ``MEMEM`` and its tail ``EME``
(15 layers: 7 Mamba, 7 MoE, 1 attention)."""
NEMOTRON_3_NANO_ROUTER = dict(
    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    moe_router_topk_scaling_factor=2.5, moe_router_dtype="fp64",
)
"""The router of Nemotron 3 Nano (HF config ``routed_scaling_factor`` 2.5, ``n_group`` 1,
``topk_group`` 1, ``norm_topk_prob`` true; Megatron-LM's Nano v3 MoE model test: sigmoid
scores, expert bias, fp64 router, aux-loss coefficient 0)."""


def nemotron_3_nano_30b_a3b() -> ModelConfig:
    """Nemotron 3 Nano 30B-A3B (HF nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config): 128
    routed experts of width 1856 and one shared expert of width 3712 per MoE layer, 6 active
    per token; 31.6B parameters, 3.2B active."""
    return ModelConfig(
        pattern=NEMOTRON_3_NANO_PATTERN, hidden_size=2688, ffn_hidden_size=1856,
        num_attention_heads=32, num_query_groups=2, kv_channels=128,
        mamba_num_heads=64, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=8,
        vocab_size=NEMOTRON_VOCAB_SIZE, seq_length=262144,
        num_moe_experts=128, moe_router_topk=6, moe_ffn_hidden_size=1856,
        moe_shared_expert_intermediate_size=3712, **NEMOTRON_3_NANO_ROUTER,
        mamba_dt_clamp_min=PUBLISHED_TIME_STEP_MIN,
    )


def nemotron_3_nano_30b_a3b_base() -> ModelConfig:
    """Nemotron 3 Nano 30B-A3B Base (HF nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16): the
    pretrained model before post-training, the same architecture."""
    return nemotron_3_nano_30b_a3b()


def tiny_nemotron_3_nano_30b_a3b() -> ModelConfig:
    """Tiny twin of nemotron-3-nano-30b-a3b: its pattern in short, 8 experts of width 32
    (hidden / 2; published 1856 / 2688) with 2 active, a shared expert twice as wide as
    published, and its router; Mamba d_inner 1.5x hidden (published 4096 / 2688)."""
    return _tiny(TINY_NEMOTRON_3_NANO_PATTERN, hidden_size=64, ffn_hidden_size=32,
                 mamba_num_heads=6, num_moe_experts=8, moe_router_topk=2,
                 moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64,
                 **NEMOTRON_3_NANO_ROUTER)


def _tiny(pattern: str, **shape) -> ModelConfig:
    """A CPU-size config: attention 8 heads / 2 KV groups / head dim 16, Mamba groups 2,
    vocab 1024, seq 256, chunk 64; ``shape`` sets the rest."""
    defaults = dict(
        num_attention_heads=8, num_query_groups=2, kv_channels=16, mamba_head_dim=16,
        mamba_state_dim=16, mamba_num_groups=2, vocab_size=1024, seq_length=256,
        mamba_chunk_size=64,
    )
    return ModelConfig(pattern=pattern, **{**defaults, **shape})


def tiny_nemotron_h_4b() -> ModelConfig:
    """Tiny twin of nemotron-h-4b: tiny-nemotron-h-8b at hidden 96 and 14 Mamba heads (the
    published 4B / 8B ratios 3072 / 4096 and 112 / 128), FFN 4x hidden as published."""
    return _tiny(TINY_H_8B_PATTERN, hidden_size=96, ffn_hidden_size=384, mamba_num_heads=14)


def tiny_nemotron_h_8b() -> ModelConfig:
    """Tiny twin of nemotron-h-8b: its head `M-M-M-M*`, one `-M-M-M-M-M*` motif (of three)
    and its tail (30 layers); FFN 5.25x hidden and Mamba d_inner 2x hidden as published."""
    return _tiny(TINY_H_8B_PATTERN, hidden_size=128, ffn_hidden_size=672, mamba_num_heads=16)


def tiny_nemotron_h_47b() -> ModelConfig:
    """Tiny twin of nemotron-h-47b: its irregular layout in short, `---MM---` block included
    (29 layers); FFN 3.75x hidden and SSM state 2x the 8B twin's as published."""
    return _tiny(TINY_H_47B_PATTERN, hidden_size=128, ffn_hidden_size=480, mamba_num_heads=16,
                 mamba_state_dim=32)


def tiny_nemotron_h_56b() -> ModelConfig:
    """Tiny twin of nemotron-h-56b: its head `M-M-M-M*-M-M-M-M-M*`, one `-M-M-M-M-M*` motif
    (of eight) and its tail (41 layers); FFN 4x hidden and SSM state 2x the 8B twin's as
    published."""
    return _tiny(TINY_H_56B_PATTERN, hidden_size=128, ffn_hidden_size=512, mamba_num_heads=16,
                 mamba_state_dim=32)


def tiny_nano_v2_12b() -> ModelConfig:
    """Tiny twin of nano-v2-12b: three `M-M-M-M*-` motifs (the 12B has six) and the same
    `M-M-M-M-` tail (35 layers); FFN 4x hidden and Mamba d_inner 2x hidden as published."""
    return _tiny(TINY_NANO_V2_12B_PATTERN, hidden_size=128, ffn_hidden_size=512,
                 mamba_num_heads=16)


def tiny_nano_v2_9b() -> ModelConfig:
    """The tiny 12B shrunk by hand as the published 12B -> 9B was: hidden 128 -> 112
    (x 4480/5120), FFN 512 -> 392 (x 15680/20480), heads unchanged, and layers
    ``TINY_NANO_V2_9B_DROPPED_LAYERS`` dropped (35 -> 31). Minitron pruning of tiny-nano-v2-12b
    gives these widths, but its depth ranking picks its own layers (docs/pruning.md)."""
    return _tiny(TINY_NANO_V2_9B_PATTERN, hidden_size=112, ffn_hidden_size=392,
                 mamba_num_heads=16)


def tiny_hybrid() -> ModelConfig:
    """Smallest hybrid for fast unit tests: 7 layers, every kind but MoE, hidden 64."""
    return ModelConfig(
        pattern="M-M*-M-", hidden_size=64, ffn_hidden_size=256,
        num_attention_heads=4, num_query_groups=2, kv_channels=16,
        mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2,
        vocab_size=512, seq_length=256, mamba_chunk_size=32,
    )


FLAVORS: dict[str, Callable[[], ModelConfig]] = {
    "nemotron-h-4b": nemotron_h_4b,
    "nemotron-h-8b": nemotron_h_8b,
    "nemotron-h-47b": nemotron_h_47b,
    "nemotron-h-56b": nemotron_h_56b,
    "nano-v2-12b": nano_v2_12b,
    "nano-v2-9b": nano_v2_9b,
    "tiny-nemotron-h-4b": tiny_nemotron_h_4b,
    "tiny-nemotron-h-8b": tiny_nemotron_h_8b,
    "tiny-nemotron-h-47b": tiny_nemotron_h_47b,
    "tiny-nemotron-h-56b": tiny_nemotron_h_56b,
    "tiny-nano-v2-12b": tiny_nano_v2_12b,
    "tiny-nano-v2-9b": tiny_nano_v2_9b,
    "nemotron-3-nano-30b-a3b": nemotron_3_nano_30b_a3b,
    "nemotron-3-nano-30b-a3b-base": nemotron_3_nano_30b_a3b_base,
    "tiny-nemotron-3-nano-30b-a3b": tiny_nemotron_3_nano_30b_a3b,
    "tiny-hybrid": tiny_hybrid,
    "tiny": tiny_hybrid,
}


def get_flavor(name: str) -> ModelConfig:
    """A fresh ``ModelConfig`` for a flavor name; ValueError listing the names if unknown."""
    factory = FLAVORS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, FLAVORS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown model flavor {name!r}: {hint}known flavors are {', '.join(FLAVORS)}"
        )
    return factory()
