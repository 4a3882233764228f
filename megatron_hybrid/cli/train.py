"""``megatron-hybrid train``: pretraining (and long-context training) from a recipe; a recipe
with a ``grpo`` section (its own or a base's) runs the GRPO stage (``megatron-hybrid grpo``)."""

from __future__ import annotations

import argparse
import os

from megatron_hybrid.cli import Command, recipe_arguments


def _print_run_header(cfg) -> None:
    from megatron_hybrid import recipe

    if int(os.environ.get("RANK", 0)) != 0:
        return
    print(f"run {cfg.name} -> {cfg.resolved_output_dir}")
    for key, value in recipe.non_default_items(cfg):
        print(f"  {key} = {value}")


def run(args: argparse.Namespace) -> int:
    from megatron_hybrid import backends, recipe

    if "grpo" in recipe.sections_of(args.recipe):  # a GRPO recipe: RL
        from megatron_hybrid.cli.stages import run_grpo

        return run_grpo(args)
    cfg = recipe.load_recipe(args.recipe, args.overrides)
    # before train imports Megatron-Core
    backends.install(cfg.parallel.backend,
                     need_transformer_engine=cfg.model.needs_transformer_engine)
    from megatron_hybrid.engine import training_loop

    _print_run_header(cfg)
    state = training_loop.run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {state.step} steps, {state.tokens:,} tokens -> {cfg.resolved_output_dir}")
    return 0


COMMANDS = {"train": Command("train from a recipe (torchrun for several ranks)",
                             recipe_arguments("recipes/tiny/pretrain.yaml", "parallel.tp=2"), run)}
