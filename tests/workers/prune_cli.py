"""The ``megatron-hybrid`` command line with the prune and distill subcommands registered
(as ``cli.COMMAND_MODULES`` lists them once wired; registering twice is harmless)."""

import sys

from megatron_hybrid import cli

if __name__ == "__main__":
    cli.COMMAND_MODULES.setdefault("prune", "megatron_hybrid.stages.prune")
    cli.COMMAND_MODULES.setdefault("distill", "megatron_hybrid.stages.distill")
    sys.exit(cli.main())
