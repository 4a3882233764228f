"""``megatron-hybrid quantize CHECKPOINT --format fp8[,nvfp4,...]``: ModelOpt PTQ of a
checkpoint, measured against the unquantized model, saved and exported
(``quantization.command``)."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from megatron_hybrid.cli import Command

SERVING_CONTEXT = 131072


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
    from megatron_hybrid.planning import planner
    from megatron_hybrid.quantization import command
    from megatron_hybrid.stages import task

    cfg = command.checkpoint_run(cfg, args.checkpoint)
    request = command.Request(
        checkpoint=args.checkpoint, formats=args.format.split(","),
        calibration_samples=args.calibration_samples, heldout_samples=args.heldout_samples,
        save=args.save, export_hf=args.export_hf, hf_target=args.hf_target)
    report = command.run(
        cfg, request, datasets=task_datasets if args.task_data else None,
        task_metric=partial(task.evaluate, samples=args.task_samples) if args.task_samples
        else None)
    report["memory"] = {"context": SERVING_CONTEXT, "formats": {
        row["format"]: planner.quantized_inference_memory(
            cfg.model, row["format"], context=SERVING_CONTEXT).__dict__
        for row in report["rows"]}}
    if args.save:
        command.write_report(report, args.save)
    print(json.dumps(report, indent=2) if args.json else command.format_markdown(report))
    return 0


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
