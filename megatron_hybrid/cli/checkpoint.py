"""``megatron-hybrid convert`` (HF <-> Megatron) and ``ckpt inspect``."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_hybrid.cli import Command


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    directions = parser.add_subparsers(dest="direction", required=True)
    to_mcore = directions.add_parser(
        "hf-to-mcore", help="HF model directory -> Megatron checkpoint (checkpoint.load=OUT)")
    to_mcore.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    to_mcore.add_argument("out", help="checkpoint directory to create (must not exist)")
    to_hf = directions.add_parser(
        "mcore-to-hf", help="Megatron checkpoint (a step_* folder) -> HF model directory")
    to_hf.add_argument("checkpoint", help="checkpoint directory (with meta.json)")
    to_hf.add_argument("out", help="HF directory to create (must not exist)")
    to_hf.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                       help="largest safetensors file, e.g. 5GB or 500MB (default 5GB)")
    to_hf.add_argument("--merge", action="store_true",
                       help="of a LoRA checkpoint: fold the adapters into the weights (without "
                            "it the base weights are written, the adapters left out)")
    to_peft = directions.add_parser(
        "lora-to-peft", help="the LoRA adapters of a checkpoint -> a PEFT adapter directory "
                             "(adapter_config.json, adapter_model.safetensors)")
    to_peft.add_argument("checkpoint", help="checkpoint of a peft.method=lora run")
    to_peft.add_argument("out", help="adapter directory to create (must not exist)")


def run_convert(args: argparse.Namespace) -> int:
    from megatron_hybrid import backends

    backends.install("cpu")  # conversion builds models on the meta device: CPU work
    from megatron_hybrid.checkpoint import hf_checkpoint

    if args.direction == "hf-to-mcore":
        converted = hf_checkpoint.import_hf(args.hf_dir, args.out)
    elif args.direction == "lora-to-peft":
        from megatron_hybrid.checkpoint import peft_adapter

        converted = f"PEFT adapter written to {peft_adapter.export_lora(args.checkpoint, args.out)}"
    else:
        converted = hf_checkpoint.export_hf(
            args.checkpoint, args.out, merge=args.merge,
            max_shard_bytes=hf_checkpoint.parse_size(args.max_shard_size))
        if converted.adapters == "left out":
            print(f"{args.checkpoint} holds LoRA adapters: wrote the base weights without them "
                  f"(export them with convert lora-to-peft, or merge them with --merge)",
                  file=sys.stderr)
    print(converted)
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    inspect = actions.add_parser("inspect", help="summarise a checkpoint (a step_* folder)")
    inspect.add_argument("checkpoint", help="checkpoint directory (with meta.json)")
    inspect.add_argument("--recipe", help="recipe YAML to compare the model config with")
    inspect.add_argument("--json", action="store_true", help="print JSON")


def run_inspect(args: argparse.Namespace) -> int:
    from megatron_hybrid.checkpoint.inspection import format_report, inspect_checkpoint

    recipe_model = None
    if args.recipe is not None:
        from megatron_hybrid.recipe import load_recipe

        recipe_model = load_recipe(args.recipe).model
    report = inspect_checkpoint(args.checkpoint, recipe=args.recipe, recipe_model=recipe_model)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


COMMANDS = {
    "convert": Command("convert checkpoints: Hugging Face NemotronH <-> Megatron (tensor by "
                       "tensor)", add_convert_arguments, run_convert),
    "ckpt": Command("inspect checkpoints: flavor, pattern, shapes, layout, step, tokens, diff vs "
                    "a recipe", add_inspect_arguments, run_inspect),
}
