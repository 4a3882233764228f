"""``megatron-hybrid`` command line: one small function per subcommand."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from megatron_hybrid import flavors, pattern, pipeline

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)
"""Errors raised for bad input; printed as one line instead of a traceback."""


def cmd_params(args: argparse.Namespace) -> int:
    from megatron_hybrid import backends

    model_cfg = flavors.get_flavor(args.flavor)
    layer_pattern = model_cfg.layer_pattern
    layer_pattern.stages(args.pp)  # refuse an impossible split before building anything
    backends.install("cpu")  # counting builds on the meta device: no GPU needed
    from megatron_hybrid.params import count_parameters

    counts = count_parameters(model_cfg)
    if args.json:
        print(json.dumps({"flavor": args.flavor, **counts}, indent=2))
        return 0
    print(f"{args.flavor}: {counts['total']:,} parameters "
          f"(embedding {counts['embedding']:,}, output layer {counts['output_layer']:,})")
    for kind in ("mamba", "attention", "mlp", "moe"):
        if counts[kind]:
            print(f"  {kind:<9} {counts[kind]:>16,}")
    print(pattern.describe(layer_pattern, args.pp, counts["per_layer"]))
    return 0


DEMO_PIPELINE = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "pipeline.yaml"


def _print_run_header(cfg) -> None:
    from megatron_hybrid import recipe

    if int(os.environ.get("RANK", 0)) != 0:
        return
    print(f"run {cfg.name} -> {cfg.resolved_output_dir}")
    for key, value in recipe.non_default_items(cfg):
        print(f"  {key} = {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from megatron_hybrid import backends, recipe

    cfg = recipe.load_recipe(args.recipe, args.overrides)
    backends.install(cfg.parallel.backend)  # before train imports Megatron-Core
    from megatron_hybrid import train

    _print_run_header(cfg)
    state = train.run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {state.step} steps, {state.tokens:,} tokens -> {cfg.resolved_output_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.pipeline = str(DEMO_PIPELINE)
    return pipeline.run(args)


COMMAND_MODULES = {
    # subcommand -> module with HELP, add_arguments(parser) and run(args) -> exit code.
    # Each module keeps heavy imports inside run(), so building the parser stays fast.
    "launch": "megatron_hybrid.launch",
    "convert": "megatron_hybrid.convert",
    "ckpt": "megatron_hybrid.ckpt",
    "prune": "megatron_hybrid.prune",
    "distill": "megatron_hybrid.distill",
    "sft": "megatron_hybrid.sft",
    "dpo": "megatron_hybrid.dpo",
    "pipeline": "megatron_hybrid.pipeline",
    "plan": "megatron_hybrid.plan",
    "bench": "megatron_hybrid.bench",
}


def _add_module_commands(commands) -> None:
    for name, module_name in COMMAND_MODULES.items():
        module = importlib.import_module(module_name)
        command = commands.add_parser(name, help=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-hybrid", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser(
        "params", help="parameter counts of a flavor, from the real model built on meta")
    params.add_argument("--flavor", required=True, help=f"one of: {', '.join(flavors.FLAVORS)}")
    params.add_argument("--pp", type=int, default=1, help="pipeline stages to describe")
    params.add_argument("--json", action="store_true", help="print JSON")
    params.set_defaults(handler=cmd_params)

    train = commands.add_parser("train", help="train from a recipe (torchrun for several ranks)")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/pretrain.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, applied last (e.g. parallel.tp=2)")
    train.set_defaults(handler=cmd_train)

    demo = commands.add_parser(
        "demo", help="the main job: the 12B -> 9B pipeline at tiny scale on the CPU "
                     "(recipes/tiny/pipeline.yaml)")
    pipeline.add_run_options(demo)
    demo.set_defaults(handler=cmd_demo)
    _add_module_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch's profiler (the planner's CPU probes) prints two lines per use at kineto's
    # highest level unless told before torch loads; stage processes inherit this.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"megatron-hybrid {args.command}: error: {err}", file=sys.stderr)
        return 2
