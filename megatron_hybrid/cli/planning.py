"""``megatron-hybrid plan`` (memory and step time before any GPU) and ``bench`` (our step
against HF's, side by side)."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_hybrid.cli import Command
from megatron_hybrid.planning.bench import (
    ADAMW_IMPLEMENTATIONS,
    DEFAULT_MODEL,
    PROCESS_SETTINGS,
    SHAPE_FIELDS,
    BenchSettings,
)
from megatron_hybrid.planning.planner import GPUS


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML (or give --flavor)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. parallel.tp=4 train.recompute=full")
    parser.add_argument("--flavor", help="a model flavor instead of a recipe (bf16, tp=pp=cp=1 "
                        "unless overridden)")
    parser.add_argument("--seq", type=int, help="sequence length of training and context of "
                        "inference (default: the recipe's / the model's)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the GPU to plan for")
    parser.add_argument("--gpus", type=int, help="GPUs of the training job (default: tp*pp*cp, "
                        "one model replica)")
    parser.add_argument("--batch", type=int, default=1, help="sequences served at once")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_plan(args: argparse.Namespace) -> int:
    from megatron_hybrid.planning.planner import GPUS, TrainingLayout, format_report, plan_report

    cfg = plan_run_config(args)
    gpu = GPUS[args.gpu]
    world_size = args.gpus or cfg.parallel.model_parallel_size
    cfg.validate(world_size)
    layout = TrainingLayout.from_run(cfg, world_size)
    report = plan_report(cfg.model, layout, gpu, context=args.seq or cfg.model.seq_length,
                         batch=args.batch)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def plan_run_config(args: argparse.Namespace):
    from megatron_hybrid import recipe
    from megatron_hybrid.planning.planner import PlanError

    positional = ([args.recipe] if args.recipe else []) + args.overrides
    if args.flavor is not None:
        if positional and "=" not in positional[0]:
            raise PlanError(f"plan: give a recipe ({positional[0]}) or --flavor "
                            f"{args.flavor}, not both")
        cfg = recipe.load_recipe(None, [f"model.flavor={args.flavor}", "train.precision=bf16",
                                        "data.mock=true",
                                        *positional])
    elif not positional:
        raise PlanError("plan: give a recipe or --flavor NAME")
    else:
        cfg = recipe.load_recipe(positional[0], positional[1:])
    if args.seq is not None:
        cfg.train.seq_length = args.seq
        cfg.model = cfg.model.replace(seq_length=max(args.seq, cfg.model.seq_length))
    return cfg


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    for name in SHAPE_FIELDS:
        default = getattr(DEFAULT_MODEL, name)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(default),
                            default=default, help=f"model.{name} (default {default})")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per side (default: torch's, i.e. the cores)")
    parser.add_argument("--adamw", choices=ADAMW_IMPLEMENTATIONS, default="fused",
                        help="torch AdamW implementation of both sides (default fused)")
    parser.add_argument("--peer-without", action="append", choices=PROCESS_SETTINGS,
                        default=[], help="withhold this process setting from the HF side "
                        "(ablation; repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    model = DEFAULT_MODEL.replace(**{name: getattr(args, name) for name in SHAPE_FIELDS})
    model.validate()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 0:
        raise ValueError("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --threads >= 0")
    return BenchSettings(model=model, batch_size=args.batch_size, warmup=args.warmup,
                         steps=args.steps, threads=args.threads, adamw=args.adamw,
                         peer_without=tuple(sorted(set(args.peer_without))))


def run_bench(args: argparse.Namespace) -> int:
    from megatron_hybrid.planning.bench import benchmark, format_report

    settings = settings_from_args(args)
    result = benchmark(settings, progress=None if args.json else sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


COMMANDS = {
    "plan": Command("per-GPU memory and step time of a recipe or flavor (training), and "
                    "inference memory", add_plan_arguments, run_plan),
    "bench": Command("training throughput of ours vs HF transformers' NemotronH on the same "
                     "model (fp32)", add_bench_arguments, run_bench),
}
