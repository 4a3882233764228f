"""What the GPU check installs, read from the one place each version is pinned: setup.py's
INSTALL_REQUIRES and its test extra's pytest, and the cuda backend's kernel releases
(megatron_hybrid/backends). fetch_wheels.sh downloads these and run.sh installs them.

    python3 tools/gpu_check/pins.py requirements              one requirement a line
    python3 tools/gpu_check/pins.py kernels                   every kernel sdist to fetch
    python3 tools/gpu_check/pins.py kernels --triton 3.6.0    the ones to build beside triton 3.6.0

Reads setup.py as text and imports only megatron_hybrid.backends (which imports no torch), so
it runs on a machine where nothing of the project is installed yet.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_hybrid import backends  # noqa: E402  (needs ROOT on the path)


def setup_py_literal(name: str):
    """The value of setup.py's top-level ``name = <literal>`` (INSTALL_REQUIRES, ...)."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == name):
            return ast.literal_eval(node.value)
    raise KeyError(f"setup.py assigns no {name}")


def requirements() -> list[str]:
    """The project's install requirements, plus the test runner the check runs them with."""
    test_runner = [r for r in setup_py_literal("EXTRAS_REQUIRE")["test"] if r.startswith("pytest")]
    return [*setup_py_literal("INSTALL_REQUIRES"), *test_runner]


def kernels(triton_version: str | None = None, *, every_release: bool = False) -> list[str]:
    """The kernel sdists: the mamba-ssm release for ``triton_version`` (or every release the
    backend may pick, for a download that does not know the GPU machine's triton) and
    causal-conv1d."""
    mamba_releases = ([backends.MAMBA_SSM_VERSION, backends.MAMBA_SSM_VERSION_BEFORE_TRITON_3_5]
                      if every_release else [backends.mamba_ssm_version_for(triton_version)])
    return [*(f"mamba-ssm=={v}" for v in mamba_releases),
            f"causal-conv1d=={backends.CAUSAL_CONV1D_VERSION}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("requirements", "kernels"))
    parser.add_argument("--triton", help="the installed triton's version (kernels only); "
                                         "without it, every release the backend may pick")
    args = parser.parse_args(argv)
    if args.what == "requirements":
        lines = requirements()
    else:
        lines = kernels(args.triton, every_release=args.triton is None)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
