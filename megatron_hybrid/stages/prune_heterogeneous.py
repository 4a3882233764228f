"""Per-layer FFN widths for the prune stage (``prune.per_layer_ffn``): heterogeneous blocks
as in Puzzle (arXiv 2411.19146) and Nemotron-H's MiniPuzzle, from Minitron's importance.

ModelOpt's ``mcore_minitron`` prunes every MLP layer to one width. Here it runs with the MLP
widths left whole, so it only ranks and sorts each layer's channels (its activation-based
importance, most important first); then the uniform target's channel budget (``target`` x
the MLP layers) is shared out over the layers by a global ranking: each layer keeps its most
important block of ``ffn_hidden_size_divisor`` channels, and the rest of the budget goes to
the blocks with the largest summed importance, over all layers. Blocks within a layer are in
descending order, so each layer keeps a prefix of its sorted channels: its width. The total
is the uniform target's, so the pruned model has exactly the uniform model's parameters.
"""

from __future__ import annotations

import torch

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.stages.config import PruneConfig

MLP = "-"


def check_request(options: PruneConfig, source: ModelConfig, pp: int) -> None:
    """Refuse, in one line, a ``prune.per_layer_ffn`` the stage cannot do (after
    ``options.check_against(source)``: the target is a multiple of the divisor)."""
    target = (options.export_config or {}).get("ffn_hidden_size")
    if target is None or target >= source.ffn_hidden_size:
        raise ConfigError(f"prune.per_layer_ffn shares out the uniform target's FFN channels: "
                          f"set prune.export_config.ffn_hidden_size below the model's "
                          f"{source.ffn_hidden_size}")
    if pp != 1:
        raise ConfigError(f"prune.per_layer_ffn runs at parallel.pp=1, got {pp}: set "
                          f"parallel.pp=1 (the checkpoint may come from any layout)")


def full_width_request(constraints: dict, source: ModelConfig) -> dict:
    """ModelOpt's manual request with the MLP width kept whole: its channels are ranked and
    sorted, none removed."""
    export = {**constraints["export_config"], "ffn_hidden_size": source.ffn_hidden_size}
    return {**constraints, "export_config": export}


def layer_importance(activations: dict, model, layer_numbers: dict[int, int],
                     pattern: str) -> dict[int, torch.Tensor]:
    """Per MLP layer of the pruned ``pattern`` (by index), ModelOpt's channel importance (the
    L2 norm over the calibration samples of each channel's mean |activation|), sorted
    descending, as its channels now are. ``activations``: ModelOpt's per-module sums of
    squares, named as before depth pruning (``layer_numbers``: layer id -> 1-based number)."""
    importance = {}
    for index, layer in enumerate(model.decoder.layers):
        if pattern[index] == MLP:
            name = f"decoder.layers.{layer_numbers[id(layer)] - 1}.mlp"
            importance[index] = activations[name].float().sqrt().sort(descending=True).values
    return importance


def ffn_widths(importance: dict[int, torch.Tensor], target: int,
               divisor: int) -> dict[int, int]:
    """Per layer, the channels kept when the ``len(importance) * target`` channels are shared
    out by a global ranking of ``divisor``-channel blocks (summed importance), each layer
    keeping at least one block."""
    blocks = {index: scores[: len(scores) // divisor * divisor].view(-1, divisor).sum(dim=1)
              for index, scores in importance.items()}
    kept = {index: 1 for index in blocks}
    rest = [(float(score), index) for index, sums in blocks.items() for score in sums[1:]]
    rest.sort(key=lambda item: item[0], reverse=True)
    for _, index in rest[: len(blocks) * (target // divisor - 1)]:
        kept[index] += 1
    return {index: count * divisor for index, count in kept.items()}


def sliced_state(state: dict, widths: dict[int, int]) -> dict:
    """``state`` (the model's state dict) with each MLP layer's fc1 rows and fc2 columns cut
    to its width: the first channels, the most important after ModelOpt's sort."""
    state = dict(state)
    for index, width in widths.items():
        prefix = f"decoder.layers.{index}.mlp."
        state[prefix + "linear_fc1.weight"] = state[prefix + "linear_fc1.weight"][:width]
        state[prefix + "linear_fc2.weight"] = state[prefix + "linear_fc2.weight"][:, :width]
    return state


def heterogeneous_config(uniform: ModelConfig, widths: dict[int, int]) -> ModelConfig:
    """``uniform`` (the pruned model at the target width) with each MLP layer's own width
    where it differs."""
    return uniform.replace(layer_overrides={
        index: {"ffn_hidden_size": width} for index, width in widths.items()
        if width != uniform.ffn_hidden_size})
