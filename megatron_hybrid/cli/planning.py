"""``megatron-hybrid plan`` (memory and step time before any GPU), ``bench`` (our training
step against HF's, side by side) and ``bench decode`` (per-token decode latency by context)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_hybrid.cli import Command
from megatron_hybrid.planning.bench import (
    ADAMW_IMPLEMENTATIONS,
    DEFAULT_MODEL,
    PROCESS_SETTINGS,
    SHAPE_FIELDS,
    BenchSettings,
)
from megatron_hybrid.planning.decode_bench import DEFAULT_CONTEXTS, DecodeSettings
from megatron_hybrid.planning.decode_bench import DEFAULT_MODEL as DECODE_MODEL
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
                        "one model replica, or as many as the experts' etp*ep*pp need)")
    parser.add_argument("--batch", type=int, default=1, help="sequences served at once")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_plan(args: argparse.Namespace) -> int:
    from megatron_hybrid.planning.planner import GPUS, TrainingLayout, format_report, plan_report

    cfg = plan_run_config(args)
    gpu = GPUS[args.gpu]
    parallel = cfg.parallel
    # One model replica, enough of them for the expert layout (etp * ep * pp ranks).
    world_size = args.gpus or math.lcm(parallel.model_parallel_size,
                                       parallel.expert_tp * parallel.ep * parallel.pp)
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


def add_model_arguments(parser: argparse.ArgumentParser, model) -> None:
    """``--hidden-size 256`` etc.: the :data:`SHAPE_FIELDS` of ``model``, its values the
    defaults."""
    for name in SHAPE_FIELDS:
        default = getattr(model, name)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(default),
                            default=default, help=f"model.{name} (default {default})")


def model_from_args(args: argparse.Namespace, model):
    return model.replace(**{name: getattr(args, name) for name in SHAPE_FIELDS})


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, DEFAULT_MODEL)
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
    benchmarks = parser.add_subparsers(
        dest="benchmark", metavar="decode", help="bench decode [options]: per-token decode "
        "latency by cached context, hybrid vs all-attention, cached vs uncached, ours vs HF "
        "(without it: training throughput)")
    decode = benchmarks.add_parser("decode", help="per-token decode latency by context")
    add_decode_arguments(decode)
    decode.set_defaults(handler=run_decode_bench)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    model = model_from_args(args, DEFAULT_MODEL)
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


def token_counts(text: str) -> tuple[int, ...]:
    """``128,512,2k`` -> (128, 512, 2048)."""
    counts = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            counts.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a token count: give e.g. "
                                             "--contexts 128,512,2k,8k") from None
    return tuple(counts)


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, DECODE_MODEL)
    defaults = DecodeSettings(model=DECODE_MODEL)
    parser.add_argument("--contexts", type=token_counts, default=DEFAULT_CONTEXTS,
                        help="cached tokens at which decode is timed, comma-separated, k = 1024 "
                        "(default " + ",".join(map(str, DEFAULT_CONTEXTS)) + ")")
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help=f"sequences decoded together (default {defaults.batch})")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens,
                        help="timed decode steps per context, and tokens per generation run "
                        f"(default {defaults.new_tokens})")
    parser.add_argument("--prompt", type=int, default=defaults.prompt,
                        help="prompt tokens of the cached / uncached / HF generation runs "
                        f"(default {defaults.prompt})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help=f"timed rounds of the generation runs (default {defaults.repeats})")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads per process (default: torch's, i.e. the cores)")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="also write the latency curves to this PNG")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run_decode_bench(args: argparse.Namespace) -> int:
    from megatron_hybrid.planning.decode_bench import benchmark, format_report, plot

    settings = DecodeSettings(model=model_from_args(args, DECODE_MODEL), contexts=args.contexts,
                              batch=args.batch, new_tokens=args.new_tokens, prompt=args.prompt,
                              repeats=args.repeats, threads=args.threads)
    settings.validate()
    result = benchmark(settings, progress=sys.stderr)
    if args.plot is not None:
        plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


COMMANDS = {
    "plan": Command("per-GPU memory and step time of a recipe or flavor (training), and "
                    "inference memory", add_plan_arguments, run_plan),
    "bench": Command("training throughput of ours vs HF transformers' NemotronH on the same "
                     "model (fp32); `bench decode`: decode latency by context",
                     add_bench_arguments, run_bench),
}
