#!/usr/bin/env bash
# The project's GPU check, on a bare GPU machine: Python 3.12 with a CUDA torch and triton, nvcc,
# no network. Installs the pinned packages from WHEELS (filled by fetch_wheels.sh), mamba-ssm
# without its CUDA build, causal-conv1d built for this GPU only, and this project; prints the
# versions; runs `pytest -m gpu` (tests/gpu). Exits non-zero when anything fails.
#
#   tools/gpu_check/run.sh [WHEELS]       WHEELS defaults to gpu-wheels/ at the repository root
#
# PYTHON (default python3) is the interpreter that gets the packages: on a machine of your own,
# point it at a venv that has a CUDA torch. With OUT set, the log also goes to $OUT/gpu_check.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WHEELS=$(realpath "${1:-$ROOT/gpu-wheels}")
PYTHON=${PYTHON:-python3}
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-420}  # both pytest phases together; the check's budget is 8 min
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
cd "$ROOT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A bare GPU machine has no venv: its system python takes the packages.
export PIP_BREAK_SYSTEM_PACKAGES=1
# mamba_ssm imports its Mamba-1 extension, which is not built here (tools/gpu_check/stand_ins).
export PYTHONPATH=$ROOT/tools/gpu_check/stand_ins${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d)
BUILD_PID=
trap '[[ -n $BUILD_PID ]] && kill "$BUILD_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
START=$(date +%s)
stage() { echo "=== [$(($(date +%s) - START))s] $*"; }
FIND_LINKS=()  # the folder and its part-N subfolders (fetch_wheels.sh)
for folder in "$WHEELS" "$WHEELS"/part-*/; do
    if [[ -d $folder ]]; then FIND_LINKS+=(--find-links "$folder"); fi
done
pip_offline() { "$PYTHON" -m pip install --quiet --no-index "${FIND_LINKS[@]}" "$@"; }

stage "requirements from $WHEELS"
"$PYTHON" tools/gpu_check/pins.py requirements > "$WORK/requirements.txt"
pip_offline -r "$WORK/requirements.txt"
TRITON_VERSION=$("$PYTHON" -c "import triton; print(triton.__version__)")
mapfile -t KERNELS < <("$PYTHON" tools/gpu_check/pins.py kernels --triton "$TRITON_VERSION")
MAMBA_SSM=${KERNELS[0]} CAUSAL_CONV1D=${KERNELS[1]}

stage "$MAMBA_SSM, Python part only (its Mamba-2 kernels are Triton)"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip_offline --no-build-isolation --no-deps "$MAMBA_SSM"
pip_offline --no-deps --no-build-isolation "$ROOT"

# causal-conv1d's setup.py compiles for a dozen architectures; this GPU's is all the check needs.
ARCH=$("$PYTHON" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
stage "$CAUSAL_CONV1D for sm_$ARCH, in the background"
build_causal_conv1d() {
    local sdist
    sdist=$(find "$WHEELS" -name "causal_conv1d-${CAUSAL_CONV1D#*==}.tar.gz" | head -n 1)
    tar xzf "$sdist" -C "$WORK"
    cd "$WORK/$(basename "$sdist" .tar.gz)"
    "$PYTHON" - "$ARCH" <<'PY'
import sys
from pathlib import Path

arch, setup = sys.argv[1], Path("setup.py")
anchor = "    # HACK: The compiler flag"  # the first line after setup.py has built cc_flag
source = setup.read_text()
assert anchor in source, "causal-conv1d's setup.py changed: find where it sets cc_flag"
only_this_gpu = f"    cc_flag = ['-gencode', 'arch=compute_{arch},code=sm_{arch}']\n"
setup.write_text(source.replace(anchor, only_this_gpu + anchor, 1))
PY
    CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=$(nproc) pip_offline --no-build-isolation --no-deps .
}
build_causal_conv1d > "$WORK/causal_conv1d_build.log" 2>&1 &
BUILD_PID=$!

stage versions
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" - <<'PY'
import importlib.metadata as metadata
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "transformers", "megatron-core", "nvidia-modelopt", "mamba-ssm",
             "transformer-engine", "megatron-hybrid"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} not installed")
PY
echo "causal-conv1d: ${CAUSAL_CONV1D#*==} (being built)"

PYTEST=("$PYTHON" -m pytest -rA -q)
DEADLINE=$(($(date +%s) + PYTEST_TIMEOUT_S))
seconds_left() { local left=$((DEADLINE - $(date +%s))); echo $((left > 1 ? left : 1)); }
status=0
stage "pytest -m 'gpu and not causal_conv1d' (while causal-conv1d builds)"
timeout "$(seconds_left)" "${PYTEST[@]}" -m "gpu and not causal_conv1d" tests/gpu || status=$?

budget_spent() {
    echo "budget of ${PYTEST_TIMEOUT_S}s spent: the tests that need causal-conv1d did not run" \
         "(raise PYTEST_TIMEOUT_S)"
    status=1
}
stage "waiting for the causal-conv1d build (until the budget is spent)"
while kill -0 "$BUILD_PID" 2>/dev/null && (($(date +%s) < DEADLINE)); do sleep 2; done
if kill -0 "$BUILD_PID" 2>/dev/null; then
    budget_spent
elif wait "$BUILD_PID"; then
    BUILD_PID=
    tail -n 3 "$WORK/causal_conv1d_build.log"
    if (($(date +%s) >= DEADLINE)); then
        budget_spent
    else
        stage "pytest -m 'gpu and causal_conv1d'"
        timeout "$(seconds_left)" "${PYTEST[@]}" -m "gpu and causal_conv1d" tests/gpu || status=$?
    fi
else
    BUILD_PID=
    echo "causal-conv1d build failed; the tests that need it did not run:"
    tail -n 40 "$WORK/causal_conv1d_build.log"
    status=1
fi
stage "done, exit status $status"
exit "$status"
