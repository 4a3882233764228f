"""``megatron-hybrid quantize CHECKPOINT --format fp8[,nvfp4,...]``: ModelOpt PTQ of a
checkpoint, measured against the unquantized model, saved and exported
(``quantization.command``); the same work as a pipeline's ``quantize`` stage, set by the
recipe's ``quant`` section."""

from __future__ import annotations

import argparse
import json
import shutil
from functools import partial
from pathlib import Path

from megatron_hybrid.cli import Command, recipe_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the unquantized checkpoint (a step_* folder)")
    parser.add_argument("--format", required=True,
                        help="fp8, nvfp4, int8_sq or int4_awq; several comma-separated are "
                             "measured side by side, the last is saved and exported")
    parser.add_argument("--recipe", help="recipe of the data, tokenizer and batch sizes "
                                         "(default: the checkpoint's config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the recipe (e.g. train.micro_batch_size=4)")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--heldout-samples", type=int, default=32)
    parser.add_argument("--task-data", action="store_true",
                        help="calibrate and measure on the arithmetic task's conversations "
                             "(train and held-out splits) instead of the recipe's data")
    parser.add_argument("--task-samples", type=int, default=0,
                        help="held-out task problems answered greedily per row (0: none)")
    parser.add_argument("--save", help="write the quantized checkpoint and the report here")
    parser.add_argument("--export-hf", help="write the quantized Hugging Face checkpoint here")
    parser.add_argument("--hf-target", default="vllm", help="vllm (ModelOpt's unified format, "
                        "also TensorRT-LLM's) or transformers (FP8 that transformers loads)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from megatron_hybrid import backends, recipe
    from megatron_hybrid.errors import ConfigError

    source = args.recipe or Path(args.checkpoint) / "config.yaml"
    if not Path(source).is_file():
        raise ConfigError(f"{source} does not exist: give a checkpoint folder (step_*) with "
                          f"its config.yaml, or --recipe")
    cfg = recipe.load_recipe(source, args.overrides)
    backends.install(cfg.parallel.backend)  # before Megatron-Core is imported
    from megatron_hybrid.quantization import command

    request = command.Request(
        checkpoint=args.checkpoint, formats=args.format.split(","),
        calibration_samples=args.calibration_samples, heldout_samples=args.heldout_samples,
        save=args.save, export_hf=args.export_hf, hf_target=args.hf_target)
    report = measure(cfg, request, task_data=args.task_data, task_samples=args.task_samples)
    if args.save:
        command.write_report(report, args.save)
    print(json.dumps(report, indent=2) if args.json else command.format_markdown(report))
    return 0


def run_stage(args) -> int:
    """A pipeline's quantize stage, ``RECIPE [key=value ...]``: ``checkpoint.load`` measured
    in bf16 and ``quant.formats``, as the ``quant`` section says; ``quant.format`` saved as
    the stage's checkpoint (``checkpoints/FORMAT``, named by ``checkpoints/latest``) and
    exported to ``hf/``; the report, the summary and that format's task tally beside them."""
    from megatron_hybrid import backends, recipe

    cfg = recipe.load_recipe(args.recipe, args.overrides)
    backends.install(cfg.parallel.backend)  # before Megatron-Core is imported
    from megatron_hybrid.pipeline.report import TASK_METRICS
    from megatron_hybrid.pipeline.runner import LATEST
    from megatron_hybrid.quantization import command
    from megatron_hybrid.stages.common import write_summary

    command.check_stage(cfg)
    quant, out = cfg.quant, Path(cfg.resolved_output_dir)
    saved, exported = out / LATEST.parent / quant.format, out / command.STAGE_EXPORT
    for path in (saved, exported):  # an unfinished stage starts again
        shutil.rmtree(path, ignore_errors=True)
    request = command.Request(
        checkpoint=str(cfg.checkpoint.load), formats=quant.formats,
        calibration_samples=quant.calibration_samples, heldout_samples=quant.heldout_samples,
        save=str(saved), export_hf=str(exported))
    report = measure(cfg, request, task_data=quant.task_data, task_samples=quant.task_samples)
    command.write_report(report, out)
    chosen = report["rows"][-1]
    write_summary(out, heldout_loss=chosen["heldout_loss"])
    if chosen["task"]:
        (out / TASK_METRICS).write_text(json.dumps({"tally": chosen["task"]}, indent=2) + "\n")
    (out / LATEST).write_text(quant.format)  # last: the stage is whole
    print(command.format_markdown(report))
    return 0


def measure(cfg, request, *, task_data: bool, task_samples: int) -> dict:
    """``command.run`` of ``request`` on the checkpoint's model (``cfg`` gives the data,
    tokenizer and batch sizes), with the task's conversations as data where ``task_data``,
    ``task_samples`` task problems per row, and the planner's serving memory per format."""
    from megatron_hybrid.planning import planner
    from megatron_hybrid.quantization import command
    from megatron_hybrid.stages.common import describe_heldout

    cfg = command.checkpoint_run(cfg, request.checkpoint)
    report = command.run(
        cfg, request, datasets=task_datasets if task_data else None,
        task_metric=partial(task_tally, samples=task_samples) if task_samples else None,
        describe=partial(describe_heldout, task=task_data))
    report["memory"] = {"context": command.SERVING_CONTEXT, "formats": {
        row["format"]: planner.quantized_inference_memory(
            cfg.model, row["format"], context=command.SERVING_CONTEXT).__dict__
        for row in report["rows"]}}
    return report


def task_tally(model, tokenizer, *, samples: int) -> dict[str, list[int]]:
    """Right answers and problems asked per task metric, of the first ``samples`` held-out
    problems."""
    from megatron_hybrid.stages import task

    return task.tally(task.heldout_answers(model, tokenizer, samples=samples))


def task_datasets(cfg, request) -> tuple:
    """(Calibration, held-out) samples of the task's training and held-out conversations."""
    from megatron_hybrid.stages.common import task_dataset

    return (task_dataset(cfg, "train", request.calibration_samples),
            task_dataset(cfg, "valid", request.heldout_samples))


COMMANDS = {
    "quantize": Command("ModelOpt post-training quantization of a checkpoint (fp8, nvfp4, "
                        "int8_sq, int4_awq): held-out loss and task accuracy against bf16, "
                        "a quantized checkpoint and a quantized Hugging Face export",
                        add_arguments, run),
}
STAGE_COMMANDS = {
    "quantize": Command("a pipeline's quantize stage: the recipe's checkpoint.load measured in "
                        "bf16 and quant.compare, saved and exported in quant.format",
                        recipe_arguments("recipes/tiny/distill.yaml", "quant.format=nvfp4"),
                        run_stage),
}
"""The pipeline stage kinds of this module (``cli.pipeline.STAGE_COMMANDS``)."""
