"""Training throughput of megatron-hybrid against HF transformers' NemotronH, side by side.

    python tools/bench_train.py                         # the default 22.7M hybrid, 1024 x 2
    python tools/bench_train.py --seq-length 2048 --steps 4 --json

The same as ``megatron-hybrid bench``; the logic lives in ``megatron_hybrid.planning.bench``.
"""

from __future__ import annotations

import sys

from megatron_hybrid.cli import main

if __name__ == "__main__":  # the benchmark's worker processes re-import this file
    sys.exit(main(["bench", *sys.argv[1:]]))
