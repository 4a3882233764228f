"""``megatron-hybrid params``: parameter counts of a flavor."""

from __future__ import annotations

import argparse
import json

from megatron_hybrid import pattern
from megatron_hybrid.cli import Command
from megatron_hybrid.model import flavors


def run_params(args: argparse.Namespace) -> int:
    from megatron_hybrid import backends

    model_cfg = flavors.get_flavor(args.flavor)
    layer_pattern = model_cfg.layer_pattern
    layer_pattern.stages(args.pp)  # refuse an impossible split before building anything
    backends.install("cpu")  # counting builds on the meta device: no GPU needed
    from megatron_hybrid.model.params import count_parameters

    counts = count_parameters(model_cfg)
    if args.json:
        print(json.dumps({"flavor": args.flavor, **counts}, indent=2))
        return 0
    print(f"{args.flavor}: {counts['total']:,} parameters "
          f"(embedding {counts['embedding']:,}, output layer {counts['output_layer']:,})")
    if counts["moe"]:
        print(f"  active per token {counts['active']:,} "
              f"({counts['active_without_embedding']:,} without the embedding)")
    for kind in ("mamba", "attention", "mlp", "moe"):
        if counts[kind]:
            print(f"  {kind:<9} {counts[kind]:>16,}")
    print(pattern.describe(layer_pattern, args.pp, counts["per_layer"]))
    return 0


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flavor", required=True, help=f"one of: {', '.join(flavors.FLAVORS)}")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages to describe")
    parser.add_argument("--json", action="store_true", help="print JSON")


COMMANDS = {"params": Command("parameter counts of a flavor, from the real model built on meta",
                              add_params_arguments, run_params)}
