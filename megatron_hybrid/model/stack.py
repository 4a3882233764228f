"""The layer stack every spec builds: Megatron-Core's MambaStack with the pattern's pipeline
stages, full activation recompute, per-layer sizes (heterogeneous blocks) and Hymba's meta
tokens. ``model/specs.py`` puts it around its layers."""

from __future__ import annotations

import dataclasses

import torch

from megatron_hybrid import mcore
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model import parallel_heads


class HybridStack(mcore.MambaStack):
    """MambaStack whose pipeline stages follow the pattern's split exactly.

    Megatron-Core 0.16's MambaStack gives each stage ``num_layers // pp`` layers (dropping the
    rest silently), always builds a Transformer-Engine final norm and ignores
    ``recompute_granularity="full"``; here the stage sizes come from the pattern module, the
    final norm from the spec, and full recompute from the :class:`RecomputedLayer` subclasses
    in place of the spec's layers (:func:`stack_layers`). ``layer_sizes`` (global 0-based
    layer index -> TransformerConfig sizes, ``model.layer_overrides``) builds those layers
    with their own sizes, and the pattern's ``H`` layers are built in MambaStack's Mamba
    slots (both :class:`LayerSlot`).
    """

    def __init__(self, config, submodules, *, stage_sizes, final_norm, post_layer_norm=True,
                 layer_sizes=None, **kwargs):
        self.stage_sizes = tuple(stage_sizes)
        layers, kwargs["hybrid_override_pattern"] = layer_slots(
            stack_layers(submodules, config), kwargs["hybrid_override_pattern"],
            layer_sizes or {}, first=sum(self.stage_sizes[: kwargs["pg_collection"].pp.rank()]))
        super().__init__(config, layers, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = mcore.build_module(
                final_norm, config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon)
        # Transformer layers number themselves assuming an even split; renumber globally
        # (the numbers key the sharded checkpoint).
        first = sum(self.stage_sizes[: self.pp_group.rank()])
        for index, layer in enumerate(self.layers):
            layer.layer_number = first + index + 1

    def _select_layers_for_pipeline_parallel(self, layer_type_list):
        rank = self.pp_group.rank()
        if len(self.stage_sizes) != self.pp_group.size():
            raise ValueError(f"{len(self.stage_sizes)} pattern stages for a pipeline of "
                             f"{self.pp_group.size()} ranks")
        first = sum(self.stage_sizes[:rank])
        return first, layer_type_list[first : first + self.stage_sizes[rank]]


class MetaTokenStack(HybridStack):
    """HybridStack with Hymba's meta tokens (``model.num_meta_tokens``): learnable vectors put
    before every sequence ahead of the first layer and taken off after the final norm, so
    every position of every layer sees them and the loss never does."""

    def __init__(self, config, submodules, *, num_meta_tokens: int, **kwargs):
        parallel_heads.check_meta_token_layout(config)
        super().__init__(config, submodules, **kwargs)
        self.meta_tokens = parallel_heads.MetaTokens(config, num_meta_tokens)

    def forward(self, hidden_states, attention_mask, inference_context=None, *args,
                packed_seq_params=None, **kwargs):
        if inference_context is not None:
            raise ConfigError(parallel_heads.CACHED_DECODE_REFUSED)
        if packed_seq_params is not None:
            raise ConfigError("model.num_meta_tokens does not run on packed documents: set "
                              "sft.pack=false or model.num_meta_tokens=0")
        output = super().forward(self.meta_tokens(hidden_states), attention_mask, None,
                                 *args, **kwargs)
        return output[self.meta_tokens.weight.shape[0]:]


class RecomputedLayer:
    """Full recompute of the layer class it is mixed into: only the layer's input is kept for
    backward, which runs the forward again (RNG states restored, non-tensor outputs skipped).
    Under FP8 it is Transformer Engine's checkpoint, which recomputes in FP8 as the forward
    ran; otherwise Megatron-Core's (as its TransformerBlock chooses)."""

    def __init__(self, *args, pg_collection, **kwargs):
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        self.recompute_tp_group = pg_collection.tp

    def forward(self, hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(hidden_states, *args, **kwargs)

        def layer(hidden):
            return super(RecomputedLayer, self).forward(hidden, *args, **kwargs)

        if self.config.fp8:
            return mcore.te_checkpoint(layer, False, mcore.tensor_parallel.get_cuda_rng_tracker,
                                       self.recompute_tp_group, hidden_states)
        return mcore.tensor_parallel.checkpoint(layer, False, hidden_states)


class RecomputedMambaLayer(RecomputedLayer, mcore.MambaLayer):
    """A Mamba layer under full recompute."""


class RecomputedTransformerLayer(RecomputedLayer, mcore.TransformerLayer):
    """An attention or MLP layer of the local spec under full recompute."""


class RecomputedMLPLayer(RecomputedLayer, mcore.MLPLayer):
    """An MLP layer of Megatron-Core's Transformer Engine spec under full recompute."""


class RecomputedMoETransformerLayer(RecomputedLayer, mcore.MoETransformerLayer):
    """A MoE layer of Megatron-Core's Transformer Engine spec under full recompute."""


class RecomputedParallelHeadsLayer(RecomputedLayer, parallel_heads.ParallelHeadsLayer):
    """A parallel-heads (``H``) layer under full recompute."""


RECOMPUTED_LAYERS = {
    mcore.MambaLayer: RecomputedMambaLayer,
    mcore.TransformerLayer: RecomputedTransformerLayer,
    mcore.MLPLayer: RecomputedMLPLayer,
    mcore.MoETransformerLayer: RecomputedMoETransformerLayer,
    parallel_heads.ParallelHeadsLayer: RecomputedParallelHeadsLayer,
}
"""Every layer class of every spec -> its recomputed subclass (same parameters and keys)."""


def recomputed_layers(submodules: "mcore.MambaStackSubmodules") -> "mcore.MambaStackSubmodules":
    """The stack's layer specs with the recomputed layer classes; a layer class without one is
    refused, so no layer silently goes without recompute."""
    replaced = {}
    for name, spec in vars(submodules).items():
        if not isinstance(spec, mcore.ModuleSpec):
            continue
        if spec.module not in RECOMPUTED_LAYERS:
            raise TypeError(f"{name}: no recomputed class for {spec.module.__qualname__}: add "
                            f"one to stack.RECOMPUTED_LAYERS")
        replaced[name] = dataclasses.replace(spec, module=RECOMPUTED_LAYERS[spec.module])
    return dataclasses.replace(submodules, **replaced)


SLOT_SYMBOLS = {"mamba_layer": "MH", "attention_layer": "*", "mlp_layer": "-", "moe_layer": "E"}
"""MambaStack's layer slots -> the pattern symbols each builds: Megatron-Core allocates only
M, *, - and E, so the pattern's ``H`` layers reach it as ``M`` and its Mamba slot builds them
(from the specs' ``parallel_heads_layer``)."""


class LayerSlot:
    """One of MambaStack's layer slots: builds, for each of its layers, the spec in ``specs``
    of the symbol ``pattern`` has at the layer's global 0-based index, under the stack's
    config with the sizes ``layer_sizes`` gives that index, where it gives some
    (heterogeneous blocks). The object built is the layer itself, not a wrapper, so parameter
    and checkpoint names stay. MambaStack numbers Mamba layers globally and the others within
    their pipeline stage, whose first global index is ``first`` (0 for the Mamba slot:
    :func:`layer_slots`)."""

    def __new__(cls, config, *, specs: dict, pattern: str, layer_sizes: dict, first: int,
                layer_number: int, **kwargs):
        index = first + layer_number - 1
        sizes = layer_sizes.get(index)
        if sizes:
            config = dataclasses.replace(config, **sizes)
        return mcore.build_module(specs[pattern[index]], config=config,
                                  layer_number=layer_number, **kwargs)


def layer_slots(submodules: "mcore.MambaStackSubmodules", pattern: str, layer_sizes: dict, *,
                first: int) -> tuple["mcore.MambaStackSubmodules", str]:
    """The stack's layer specs and its (global) pattern as MambaStack takes them: as they are
    without ``H`` layers and per-layer sizes; else each slot a :class:`LayerSlot`, in the
    pipeline stage whose first layer has global index ``first``, and ``H`` as ``M``."""
    if "H" not in pattern and not layer_sizes:
        return submodules, pattern
    specs = {"H": getattr(submodules, "parallel_heads_layer", None),
             **{symbols[0]: getattr(submodules, name) for name, symbols in SLOT_SYMBOLS.items()}}
    return dataclasses.replace(submodules, **{
        name: mcore.ModuleSpec(module=LayerSlot, params={
            "specs": {symbol: specs[symbol] for symbol in symbols}, "pattern": pattern,
            "layer_sizes": layer_sizes, "first": 0 if name == "mamba_layer" else first})
        for name, symbols in SLOT_SYMBOLS.items()
        if isinstance(getattr(submodules, name), mcore.ModuleSpec)}), pattern.replace("H", "M")


def stack_layers(submodules: "mcore.MambaStackSubmodules",
                 config: "mcore.TransformerConfig") -> "mcore.MambaStackSubmodules":
    """The layer specs :class:`HybridStack` builds under ``config``."""
    if config.recompute_granularity == "full":
        return recomputed_layers(submodules)
    return submodules
