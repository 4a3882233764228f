"""The ``megatron-hybrid`` command line, as a script the prune and distill tests start."""

import sys

from megatron_hybrid import cli

if __name__ == "__main__":
    sys.exit(cli.main())
