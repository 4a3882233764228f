"""``megatron-hybrid config RECIPE``: what a run of the recipe resolves to in Megatron-Core.

It prints the TransformerConfig, DistributedDataParallelConfig and OptimizerConfig that
training builds, the layer class of every layer kind in the spec, and the environment the
launcher sets. It builds no model and needs no GPU: ``--backend cuda`` resolves the cuda
settings on any machine, without importing Transformer Engine (its modules sit inside the
layer classes shown). Prune and distill recipes show the local spec those stages build.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import textwrap
import warnings

from megatron_hybrid.cli import Command, recipe_arguments

SECTIONS = ("transformer", "ddp", "optimizer", "spec", "env")
"""The top-level keys of ``--json``."""
LAYER_KINDS = {"mamba": "mamba_layer", "attention": "attention_layer", "mlp": "mlp_layer",
               "moe": "moe_layer"}
"""Layer kind -> its slot in Megatron-Core's MambaStackSubmodules."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipe_arguments("recipes/tiny/pretrain.yaml", "train.recompute=full")(parser)
    parser.add_argument("--backend", choices=("cpu", "cuda"),
                        help="the backend to resolve for (default: the recipe's "
                             "parallel.backend; auto: what this machine would choose); cuda "
                             "needs no GPU here, as nothing is built or run")
    parser.add_argument("--json", action="store_true",
                        help=f"print JSON with the keys {', '.join(SECTIONS)}")


def run(args: argparse.Namespace) -> int:
    from megatron_hybrid import backends, recipe

    cfg = recipe.load_recipe(args.recipe, args.overrides)
    backend = args.backend or _recipe_backend(cfg)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend=backend))
    cfg.validate()
    # Megatron-Core binds its Mamba kernels at import: the cpu backend's kernels do for
    # resolving the configs of either backend, as nothing runs.
    backends.install("cpu")
    with warnings.catch_warnings():
        # Without Transformer Engine, Megatron-Core's TE spec warns at import that its MoE
        # falls back to the legacy GroupedMLP: a GPU run with TE builds TE's own.
        warnings.filterwarnings("ignore", message="The legacy GroupedMLP")
        settings = resolved_settings(_as_its_stage_builds(cfg), backend)
    print(json.dumps(settings, indent=2) if args.json else format_settings(settings, cfg.name,
                                                                          backend))
    return 0


def _recipe_backend(cfg) -> str:
    """The recipe's backend, with ``auto`` chosen as ``backends.install`` would here."""
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    import torch

    from megatron_hybrid import backends

    return backends.choose(
        "auto", cuda_available=torch.cuda.is_available(),
        missing_packages=backends.missing_gpu_packages(cfg.model.needs_transformer_engine))


def _as_its_stage_builds(cfg):
    """A prune or distill recipe as that stage builds it (the local spec, for ModelOpt)."""
    from megatron_hybrid.stages import common

    if cfg.prune.mode is not None:
        return common.with_modelopt_spec(cfg, "prune")
    if cfg.distill.teacher:
        return common.with_modelopt_spec(cfg, "distill")
    return cfg


def resolved_settings(cfg, backend: str) -> dict:
    """The ``--json`` document: each config object field by field, the spec and the
    launcher's environment."""
    from megatron_hybrid import launch
    from megatron_hybrid.engine import training_loop, training_step
    from megatron_hybrid.model import build
    from megatron_hybrid.parallel.process_groups import ParallelDims

    parallel = cfg.parallel
    dims = ParallelDims.of(parallel, parallel.model_parallel_size)
    transformer = build.transformer_config(cfg.model, training_loop.model_layout(cfg, dims),
                                           backend=backend)
    ddp = training_step.ddp_config(
        transformer, use_distributed_optimizer=parallel.distributed_optimizer, backend=backend)
    optimizer = training_step.optimizer_config(training_loop.optimizer_settings(cfg),
                                               transformer)
    return {"transformer": _fields(transformer), "ddp": _fields(ddp),
            "optimizer": _fields(optimizer), "spec": spec_classes(cfg.model, backend, transformer),
            "env": launch.launcher_environment(cfg)}


def spec_classes(model, backend: str, transformer) -> dict:
    """The spec ``model`` builds on ``backend``: its implementation and the class of each
    layer kind (the recomputed ones under full recompute) and of the final norm."""
    from megatron_hybrid.model import build, specs, stack

    stages = model.layer_pattern.stages(transformer.pipeline_model_parallel_size)
    spec = specs.stack_spec(backend, [len(stage) for stage in stages], build.mixer_params(model),
                            transformer_impl=model.transformer_impl,
                            **build.parallel_heads_options(model))
    layers = stack.stack_layers(spec.submodules, transformer)
    kinds = {**LAYER_KINDS, **({"parallel_heads": "parallel_heads_layer"}
                               if model.layer_pattern.counts["H"] else {})}
    return {"transformer_impl": model.transformer_impl,
            "implementation": specs.implementation(backend, model.transformer_impl),
            "layers": {kind: _name(getattr(layers, slot).module) for kind, slot in kinds.items()},
            "final_norm": _name(spec.params["final_norm"])}


def _fields(config) -> dict:
    return {field.name: _plain(getattr(config, field.name))
            for field in dataclasses.fields(config)}


def _plain(value):
    """``value`` as JSON: functions and classes by qualified name, enums by name, dtypes and
    other objects by ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, functools.partial):
        return _name(value.func)
    if hasattr(value, "__qualname__"):
        return _name(value)
    return str(value)


def _name(function_or_class) -> str:
    return f"{function_or_class.__module__}.{function_or_class.__qualname__}"


def _non_default(config_fields: dict, config_class) -> dict:
    defaults = {field.name: _plain(field.default_factory()
                                   if field.default_factory is not dataclasses.MISSING
                                   else field.default)
                for field in dataclasses.fields(config_class)
                if (field.default, field.default_factory) != (dataclasses.MISSING,) * 2}
    return {name: value for name, value in config_fields.items()
            if name not in defaults or defaults[name] != value}


def format_settings(settings: dict, name: str, backend: str) -> str:
    """Human output: the spec's classes, then each config's fields that differ from
    Megatron-Core's defaults, then the launcher's environment."""
    from megatron_hybrid import mcore

    spec = settings["spec"]
    lines = [f"{name} on backend={backend} (resolved, nothing built)",
             f"spec: transformer_impl={spec['transformer_impl']} -> {spec['implementation']}",
             *(f"  {kind:<10} {path.rsplit('.', 1)[1]}"
               for kind, path in {**spec["layers"], "final norm": spec["final_norm"]}.items())]
    for key, config_class in (("transformer", mcore.TransformerConfig),
                              ("ddp", mcore.DistributedDataParallelConfig),
                              ("optimizer", mcore.OptimizerConfig)):
        changed = _non_default(settings[key], config_class)
        lines.append(f"{key} ({config_class.__name__}, fields not at Megatron-Core's default):")
        lines.append(_wrapped(f"{field}={value}" for field, value in changed.items()))
    lines.append("env (set by the launcher unless already set):")
    lines.append(_wrapped(f"{variable}={value}" for variable, value in settings["env"].items()))
    return "\n".join(lines)


def _wrapped(items) -> str:
    return textwrap.fill("  ".join(items), width=100, initial_indent="  ",
                         subsequent_indent="  ", break_on_hyphens=False) or "  (none)"


COMMANDS = {"config": Command("the Megatron-Core configs, layer classes and launcher environment "
                              "a recipe resolves to (no GPU needed)", add_arguments, run)}
