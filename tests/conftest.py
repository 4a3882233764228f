"""Thread counts and the strict cpu backend for the test session and every process it starts.

torch's default (one thread per core) makes results and timings depend on the machine, and
several processes each taking every core oversubscribe it (gloo ranks spin while they wait).
The session runs at ``SESSION_THREADS`` unless the environment already sets OMP_NUM_THREADS
(the suite also runs at 1); children inherit it, and multi-rank launches split it over their
ranks with ``rank_environment``.

The whole suite runs the cpu backend strict (``backends/cpu.py``): project code that uses the
CUDA device, which only the cpu backend's redirect makes work, fails here as it would on GPUs.
"""

import os
import sys
from pathlib import Path

SESSION_THREADS = 2
"""The CI machine's cores: a fixed number, so a bigger machine runs the same numerics."""

os.environ.setdefault("OMP_NUM_THREADS", str(SESSION_THREADS))
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ["MEGATRON_HYBRID_STRICT_CPU"] = "1"


TESTS = Path(__file__).resolve().parent
# tests/ mirrors the package, one folder per room; some tests reuse another room's helpers and
# fixtures by module name (test basenames are unique), so every room is importable from any.
for room in sorted(path for path in TESTS.iterdir()
                   if path.is_dir() and any(path.glob("test_*.py"))):
    if str(room) not in sys.path:
        sys.path.append(str(room))


def rank_environment(nproc: int) -> dict[str, str]:
    """This environment with the session's threads split over ``nproc`` processes sharing it
    (torchrun keeps an inherited OMP_NUM_THREADS for every rank)."""
    threads = str(max(1, int(os.environ["OMP_NUM_THREADS"]) // nproc))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the collected tests in reverse order (shows no test depends on "
                          "another having run first)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()
