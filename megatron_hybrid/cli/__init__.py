"""``megatron-hybrid`` command line: parsing only; each command group has its own module.

A group module lists its commands in ``COMMANDS``: name -> :class:`Command`. Modules keep heavy
imports inside the handlers, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

from megatron_hybrid.errors import USER_ERRORS

COMMAND_GROUPS = ("model", "train", "pipeline", "launch", "checkpoint", "stages", "planning",
                  "config", "inference", "serving", "evaluation", "quantize")
"""The modules of ``megatron_hybrid.cli`` that define commands, in the order of ``--help``."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def recipe_arguments(example_recipe: str, example_override: str) -> Callable:
    """``add_arguments`` for a command that takes a recipe and dotted overrides."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("recipe", help=f"recipe YAML, e.g. {example_recipe}")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help=f"dotted overrides, applied last (e.g. {example_override})")
    return add_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-hybrid", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        module = importlib.import_module(f"megatron_hybrid.cli.{group}")
        for name, command in module.COMMANDS.items():
            subparser = commands.add_parser(name, help=command.help)
            command.add_arguments(subparser)
            subparser.set_defaults(handler=command.run)
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
