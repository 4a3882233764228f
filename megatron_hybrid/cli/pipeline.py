"""``megatron-hybrid pipeline`` and ``demo``: run a pipeline of stages and write its report;
``python -m megatron_hybrid.cli.pipeline KIND ...`` is one stage's process."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_hybrid.cli import Command, quantize, stages, train
from megatron_hybrid.errors import USER_ERRORS
from megatron_hybrid.pipeline import runner

DEMO_PIPELINE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pipeline.yaml"
STAGE_COMMANDS = {**train.COMMANDS, **stages.COMMANDS, **quantize.STAGE_COMMANDS}
"""Every ``runner.STAGE_KINDS`` kind, and the command that runs it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML, e.g. recipes/tiny/pipeline.yaml")
    add_run_options(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of a pipeline run (shared with ``megatron-hybrid demo``)."""
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (stages, inputs, layouts, estimates); run nothing")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--only", metavar="STAGE", help="run only this stage")
    selection.add_argument("--from", dest="start", metavar="STAGE",
                           help="run this stage and the ones after it")
    parser.add_argument("--output", metavar="DIR",
                        help="output folder (default: the file's output_dir, runs/{pipeline})")


def run(args: argparse.Namespace) -> int:
    from megatron_hybrid.pipeline import report
    from megatron_hybrid.pipeline.runner import (
        check_inputs_ready,
        describe_plan,
        load_pipeline,
        plan_stage,
        run_planned,
        select,
    )

    pipeline = load_pipeline(args.pipeline, output_dir=args.output)
    selected = select(pipeline, only=args.only, start=args.start)
    plans = [plan_stage(pipeline, stage, stage.name in selected) for stage in pipeline.stages]
    check_inputs_ready(pipeline, selected)
    if args.dry_run:
        print(describe_plan(pipeline, plans))
        return 0
    for plan in plans:
        run_planned(pipeline, plan)
    print(f"report: {report.write_report(pipeline)}")
    return 0


def run_stage(argv: list[str]) -> int:
    """``KIND RECIPE [key=value ...]``: run one stage in this process (one rank); or
    ``evaluate CHECKPOINT N OUT.json``: score a stage's checkpoint on the task."""
    kind, *arguments = argv
    try:
        if kind == runner.EVALUATE:
            return _evaluate(*arguments)
        recipe_path, *overrides = arguments
        return STAGE_COMMANDS[kind].run(argparse.Namespace(recipe=recipe_path, overrides=overrides))
    except USER_ERRORS as err:
        print(f"megatron-hybrid {kind}: error: {err}", file=sys.stderr)
        return 2


def _evaluate(checkpoint: str, samples: str, output: str) -> int:
    """Score ``checkpoint`` on the held-out task; write the right answers per mode (with the
    problems asked) and the seconds it took to ``output``."""
    from megatron_hybrid.stages import task

    started = time.monotonic()
    tally = task.tally(task.checkpoint_answers(checkpoint, samples=int(samples)))
    seconds = time.monotonic() - started
    Path(output).write_text(json.dumps({"tally": tally, "seconds": round(seconds, 1)},
                                       indent=2) + "\n")
    print("task: " + ", ".join(f"{name} {correct}/{asked}"
                               for name, (correct, asked) in tally.items())
          + f" ({seconds:.0f} s)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    args.pipeline = str(DEMO_PIPELINE)
    return run(args)


COMMANDS = {
    "demo": Command("the main job: the 12B -> 9B pipeline at tiny scale on the CPU "
                    "(recipes/tiny/pipeline.yaml)", add_run_options, run_demo),
    "pipeline": Command("run a pipeline of stages (pretrain, SFT, DPO, prune, distill, ...) and "
                        "write a report", add_arguments, run),
}

if __name__ == "__main__":
    raise SystemExit(run_stage(sys.argv[1:]))
