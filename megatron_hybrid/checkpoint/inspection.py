"""``megatron-hybrid ckpt inspect``: what a checkpoint holds, from its meta.json and tensor index.

Reports the closest named flavor, the layer pattern and shapes, the parameters actually saved
(and their dtypes), the layout it was saved with, the step and tokens trained, the tokenizer,
and with ``--recipe`` how the checkpoint's model differs from a recipe's.

There is no ``ckpt reshard``: dist_checkpointing checkpoints hold global tensors, so any
TP/PP/CP layout loads any checkpoint directly (``checkpoint.load=CKPT`` with new
``parallel.*`` values); see docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from megatron_hybrid import pattern
from megatron_hybrid.model import flavors
from megatron_hybrid.model.config import ModelConfig

ORIGIN_KEYS = ("converted_from", "pruned_from")
"""meta.json keys saying where a checkpoint's weights came from (conversion, pruning)."""
SHAPE_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig)
                         if f.default is dataclasses.MISSING)
"""The model fields a flavor is defined by (the pattern compared without stage marks)."""


def inspect_checkpoint(directory, *, recipe: str | None = None,
                       recipe_model: ModelConfig | None = None) -> dict:
    """The facts ``ckpt inspect`` prints, as plain JSON-ready values; with ``recipe_model`` (the
    model of the recipe at ``recipe``) also how the checkpoint's model differs from it."""
    from megatron_hybrid import backends

    if backends.active() is None:
        backends.install("cpu")  # checkpoint.py reads through Megatron-Core
    from megatron_hybrid.checkpoint import dist_checkpoint

    meta = dist_checkpoint.read_meta(directory)
    model = ModelConfig(**meta["model"])
    flavor, flavor_differences = closest_flavor(model)
    report = {
        "checkpoint": str(directory), "flavor": flavor,
        "differences_from_flavor": flavor_differences, "model": model.to_dict(),
        **_saved_tensors(directory), "layout": meta["layout"], **meta["train_state"],
        "tokenizer": meta["tokenizer"],
        **{key: meta[key] for key in ORIGIN_KEYS if key in meta},
    }
    if recipe_model is not None:
        report["recipe"] = str(recipe)
        report["recipe_differences"] = model_differences(model, recipe_model)
    return report


def _saved_tensors(directory) -> dict:
    """Parameters saved (optimizer state excluded), per dtype, and whether optimizer state is."""
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint.sharded_io import OPTIMIZER_KEY_PREFIX

    saved = mcore.dist_checkpointing.load_tensors_metadata(str(directory))
    by_dtype = Counter()
    for key, tensor in saved.items():
        if not key.startswith(OPTIMIZER_KEY_PREFIX):
            by_dtype[str(tensor.dtype).removeprefix("torch.")] += math.prod(tensor.global_shape)
    return {"parameters": sum(by_dtype.values()), "parameters_by_dtype": dict(by_dtype),
            "optimizer_state": any(key.startswith(OPTIMIZER_KEY_PREFIX) for key in saved)}


def closest_flavor(model: ModelConfig) -> tuple[str | None, dict]:
    """The named flavor with ``model``'s layers and shapes and the fewest other differences,
    with those differences; ``(None, {})`` when no flavor has them."""
    best: tuple[str | None, dict] = (None, {})
    for name in flavors.FLAVORS:
        differences = model_differences(model, flavors.get_flavor(name))
        if SHAPE_FIELDS.isdisjoint(differences) and (
                best[0] is None or len(differences) < len(best[1])):
            best = (name, differences)
    return best


def model_differences(model: ModelConfig, other: ModelConfig) -> dict:
    """``{field: [model's value, other's value]}`` where they differ; patterns are compared
    by their layers (``|`` stage marks only say how a run splits them)."""
    differences = {}
    for key, value in model.to_dict().items():
        theirs = getattr(other, key)
        same = (model.layer_pattern.layers == other.layer_pattern.layers if key == "pattern"
                else value == theirs)
        if not same:
            differences[key] = [value, theirs]
    return differences


def format_report(report: dict) -> str:
    model = ModelConfig(**report["model"])
    layers = model.layer_pattern
    described = pattern.describe(layers, len(layers.explicit_stages or (layers.layers,)))
    first, *stages = described.removeprefix("pattern ").splitlines()
    lines = [
        f"checkpoint  {report['checkpoint']}",
        f"flavor      {_flavor_text(report)}",
        f"pattern     {first}",
        *(f"            {stage}" for stage in stages),
        f"shapes      {_shapes_text(model)}",
        f"parameters  {report['parameters']:,} "
        f"({', '.join(f'{n:,} {dtype}' for dtype, n in report['parameters_by_dtype'].items())})",
        f"saved as    {_layout_text(report['layout'])} (loads in any TP/PP/CP/EP layout)",
        f"trained     step {report['step']}, {report['tokens']:,} tokens, "
        f"{report['consumed_samples']:,} samples{_origin_text(report)}",
        f"optimizer   {'saved' if report['optimizer_state'] else 'not saved (weights only)'}",
        f"tokenizer   {_tokenizer_text(report['tokenizer'])}",
    ]
    if "recipe" in report:
        differences = _differences_text(report["recipe_differences"], "recipe")
        lines.append(f"recipe      {report['recipe']}: {differences}")
    return "\n".join(lines)


def _flavor_text(report: dict) -> str:
    if report["flavor"] is None:
        return "none (no named flavor has these layers and shapes)"
    differences = report["differences_from_flavor"]
    return report["flavor"] + (f" ({_differences_text(differences, 'flavor')})"
                               if differences else "")


def _origin_text(report: dict) -> str:
    origins = [f"{key.replace('_', ' ')} {report[key]}" for key in ORIGIN_KEYS if key in report]
    return f" ({'; '.join(origins)})" if origins else ""


def _differences_text(differences: dict, other: str) -> str:
    if not differences:
        return "same model"
    return "differs in " + "; ".join(f"{key} {ours!r} (checkpoint) vs {theirs!r} ({other})"
                                     for key, (ours, theirs) in differences.items())


def _shapes_text(model: ModelConfig) -> str:
    return (f"hidden {model.hidden_size}, ffn {model.ffn_hidden_size}, attention "
            f"{model.num_attention_heads} heads / {model.num_query_groups} groups x "
            f"{model.kv_channels}, Mamba {model.mamba_num_heads} heads x {model.mamba_head_dim} "
            f"(state {model.mamba_state_dim}, {model.mamba_num_groups} groups), vocab "
            f"{model.vocab_size}, seq {model.seq_length}")


def _layout_text(layout: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in layout.items())


def _tokenizer_text(tokenizer: dict | None) -> str:
    if not tokenizer:
        return "not recorded"
    return (f"{tokenizer['kind']}, vocab {tokenizer['vocab_size']}, "
            f"sha256 {tokenizer['sha256'][:12]}")
