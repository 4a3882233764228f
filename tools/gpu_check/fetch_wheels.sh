#!/usr/bin/env bash
# Gathers, on a machine with the package registries, what run.sh installs on a GPU machine that
# has Python 3.12, a CUDA torch and triton, and no network:
#   - cp312 wheels of the project's requirements and of everything they depend on, less the CUDA
#     torch stack the GPU machine brings (torch, triton, nvidia-cu*/nv*, cuda-*);
#   - the sdists of the Mamba kernels (run.sh builds them there), every mamba-ssm release the
#     cuda backend may pick for the GPU machine's triton.
# The versions come from tools/gpu_check/pins.py (setup.py and megatron_hybrid/backends).
#
#   tools/gpu_check/fetch_wheels.sh [DIR]        DIR defaults to gpu-wheels/ at the repository root
#
# PYTHON (default: the project's .venv, else python3) must have pip and torch: the kernel
# sdists' metadata step imports torch (any build, the CPU one is fine).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=$(realpath -m "${1:-$ROOT/gpu-wheels}")
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    [[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "fetch_wheels.sh: $PYTHON cannot import torch: run make setup, or set PYTHON to a python with torch" >&2
    exit 1
fi

# The GPU machine's interpreter. Platforms up to manylinux_2_28: the oldest glibc that PyPI's
# CUDA torch wheels run on, so any machine with such a torch takes these wheels.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for glibc_minor in $(seq 17 28); do
    TARGET+=(--platform "manylinux_2_${glibc_minor}_x86_64")
done
TORCH_STACK='^(torch|triton|cuda-[a-z0-9-]+|nvidia-(cu|nccl|nv)[a-z0-9-]*)$'

mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" "$ROOT/tools/gpu_check/pins.py" requirements > "$WORK/requirements.txt"
"$PYTHON" "$ROOT/tools/gpu_check/pins.py" kernels > "$WORK/kernels.txt"

echo "resolving $(wc -l < "$WORK/requirements.txt") requirements for cp312"
"$PYTHON" -m pip install --quiet --dry-run --ignore-installed --target "$WORK/resolve" \
    "${TARGET[@]}" --report "$WORK/report.json" -r "$WORK/requirements.txt"
"$PYTHON" - "$WORK/report.json" "$TORCH_STACK" > "$WORK/pins.txt" <<'PY'
import json
import re
import sys

report, torch_stack = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not torch_stack.match(name.lower()):
        print(f"{name}=={version}")
PY
echo "downloading $(wc -l < "$WORK/pins.txt") wheels"
"$PYTHON" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$DEST" -r "$WORK/pins.txt"

# Kernel sdists: no CUDA compile and no prebuilt-wheel lookup during their metadata step.
echo "downloading the kernel sdists: $(tr '\n' ' ' < "$WORK/kernels.txt")"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "$PYTHON" -m pip download --quiet --no-deps --no-build-isolation --no-binary=:all: \
    -d "$DEST" -r "$WORK/kernels.txt"

# Parts of at most PART_MIB each (default 60), so the folder can be moved in pieces where
# transfers are limited. run.sh reads the folder and its parts.
"$PYTHON" - "$DEST" "${PART_MIB:-60}" <<'PY'
import sys
from pathlib import Path

dest, limit = Path(sys.argv[1]), int(sys.argv[2]) * 2**20
files = sorted((p for p in dest.rglob("*") if p.is_file() and p.suffix in (".whl", ".gz")),
               key=lambda p: -p.stat().st_size)
parts: list[int] = []
for path in files:  # largest first, each into the first part it fits
    size = path.stat().st_size
    index = next((i for i, used in enumerate(parts) if used + size <= limit), len(parts))
    if index == len(parts):
        parts.append(0)
    parts[index] += size
    target = dest / f"part-{index + 1}" / path.name
    target.parent.mkdir(exist_ok=True)
    path.rename(target)
for index, used in enumerate(parts):
    print(f"{dest}/part-{index + 1}: {used / 2**20:.0f} MiB")
PY
