"""The precisions a run trains in, and the FP8 recipes of the published models.

An FP8 recipe is a name -> settings entry, as Megatron-Bridge's named mixed-precision configs
(``megatron/bridge/training/mixed_precision.py``): a recipe file says
``train.precision: fp8-nano-v2`` and gets the published format, scaling, bf16 layers and FP8
parameter gather together. FP8 runs on Transformer Engine (the cuda backend only). Layer
counts are pattern symbols (each Mamba, attention or MLP layer holds two GEMMs), so two
layers at each end keep the "first and last four matmuls" of the papers in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Fp8Recipe:
    """Megatron-Core's FP8 settings of one recipe."""

    format: str
    """``e4m3`` (every tensor E4M3) or ``hybrid`` (E4M3 forward, E5M2 gradients)."""
    scaling: str
    """Transformer Engine scaling: ``tensorwise`` (per-tensor current scaling) or
    ``blockwise`` (128x128 weight blocks, 1x128 activation tiles; Hopper)."""
    bf16_layers_at_start: int
    """Layers (pattern symbols) at the start of the model kept in bf16."""
    bf16_layers_at_end: int
    """Layers at the end of the model kept in bf16."""
    param_gather: bool
    """Keep the weights in FP8 and all-gather them in FP8 (distributed optimizer); the
    optimizer's master weights and states stay fp32."""


FP8_RECIPES = {
    # Per-tensor current scaling, one bf16 layer at each end: Megatron-Bridge's
    # bf16_with_fp8_current_scaling_mixed without its FP8 parameter gather.
    "fp8-hybrid": Fp8Recipe(format="hybrid", scaling="tensorwise", bf16_layers_at_start=1,
                            bf16_layers_at_end=1, param_gather=False),
    # Nemotron-H 47B/56B: Megatron-Bridge nemotron_h_bf16_with_fp8_current_scaling_mixed.
    "fp8-nemotron-h": Fp8Recipe(format="hybrid", scaling="tensorwise", bf16_layers_at_start=2,
                                bf16_layers_at_end=2, param_gather=True),
    # Nemotron Nano 2 (arXiv 2508.14444): E4M3 for all tensors, blockwise scaling; bf16
    # layers and FP8 gather as Megatron-Bridge nanov2_bf16_with_fp8_current_scaling_mixed.
    "fp8-nano-v2": Fp8Recipe(format="e4m3", scaling="blockwise", bf16_layers_at_start=2,
                             bf16_layers_at_end=2, param_gather=True),
}

PRECISIONS = ("fp32", "bf16", *FP8_RECIPES)


def fp8_recipe(precision: str) -> Fp8Recipe | None:
    """The FP8 recipe of ``precision``; None for fp32 and bf16."""
    return FP8_RECIPES.get(precision)


def transformer_config_fields(precision: str) -> dict:
    """Megatron-Core TransformerConfig fields of ``precision``'s FP8 recipe (none for fp32 and
    bf16); ``fp8_param`` is the model half of the FP8 parameter gather (DDP holds the other)."""
    recipe = fp8_recipe(precision)
    if recipe is None:
        return {}
    return {"fp8": recipe.format, "fp8_recipe": recipe.scaling,
            "first_last_layers_bf16": True,
            "num_layers_at_start_in_bf16": recipe.bf16_layers_at_start,
            "num_layers_at_end_in_bf16": recipe.bf16_layers_at_end,
            "fp8_param": recipe.param_gather}
