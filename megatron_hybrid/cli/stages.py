"""``megatron-hybrid sft | dpo | grpo | reward-model | prune | distill``: the stages after
pretraining, each run in a session of its recipe (``engine.training_loop.run_stage``)."""

from __future__ import annotations

from functools import partial

from megatron_hybrid.cli import Command, recipe_arguments


def section_stage(module: str, function: str):
    """The command of a stage that trains with ``stages.MODULE.FUNCTION(cfg, cfg.MODULE)``,
    its recipe section named as its module, and prints ``stages.MODULE.format_summary``."""
    def run(args) -> int:
        from importlib import import_module

        from megatron_hybrid import backends, recipe

        cfg = recipe.load_recipe(args.recipe, args.overrides)
        # before the loop imports Megatron-Core
        backends.install(cfg.parallel.backend,
                         need_transformer_engine=cfg.model.needs_transformer_engine)
        from megatron_hybrid.engine import training_loop

        stage = import_module(f"megatron_hybrid.stages.{module}")
        return training_loop.run_stage(
            cfg, partial(getattr(stage, function), cfg, getattr(cfg, module)),
            stage.format_summary)
    return run


run_sft = section_stage("sft", "finetune")
run_dpo = section_stage("dpo", "optimize")
run_grpo = section_stage("grpo", "optimize")
run_reward_model = section_stage("reward_model", "train")


def run_prune(args) -> int:
    from megatron_hybrid import recipe
    from megatron_hybrid.stages import prune

    cfg = prune.check_request(recipe.load_recipe(args.recipe, args.overrides))
    from megatron_hybrid.engine import training_loop

    return training_loop.run_stage(cfg, partial(prune.prune, cfg), prune.format_summary)


def run_distill(args) -> int:
    from megatron_hybrid import recipe
    from megatron_hybrid.stages import distill

    cfg, teacher = distill.check_request(recipe.load_recipe(args.recipe, args.overrides))
    from megatron_hybrid.engine import training_loop

    return training_loop.run_stage(cfg, partial(distill.distill, cfg, teacher),
                                   distill.format_summary)


COMMANDS = {
    "prune": Command("prune a checkpoint with ModelOpt Minitron (given sizes or a parameter "
                     "budget)",
                     recipe_arguments("recipes/tiny/prune.yaml", "prune.max_params=2e6"),
                     run_prune),
    "distill": Command("distill a student checkpoint from a frozen teacher (ModelOpt KD, the "
                       "training loop)",
                       recipe_arguments("recipes/tiny/distill.yaml", "train.max_steps=50"),
                       run_distill),
    "sft": Command("supervised fine-tuning on chat data with the /think /no_think reasoning toggle",
                   recipe_arguments("recipes/tiny/sft.yaml", "sft.pack=false"), run_sft),
    "dpo": Command("direct preference optimisation (DPO) of a chat checkpoint on preference pairs",
                   recipe_arguments("recipes/tiny/dpo.yaml", "dpo.beta=0.2"), run_dpo),
    "grpo": Command("reinforcement learning (GRPO) with verifiable rewards, rollouts on the "
                    "inference engine",
                    recipe_arguments("recipes/tiny/grpo.yaml", "grpo.kl_coef=0.05"), run_grpo),
    "reward-model": Command("train a reward model (a scalar head on the hybrid) on preference "
                            "pairs or rated responses",
                            recipe_arguments("recipes/tiny/reward_model.yaml",
                                             "reward_model.objective=regression"),
                            run_reward_model),
}
"""Each entry is also a pipeline stage kind (``cli.pipeline.run_stage``)."""
