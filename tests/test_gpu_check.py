"""The GPU check (tools/gpu_check, tests/gpu, docs/gpu.md), checked where it cannot run: what
it installs follows the project's pins, its scripts parse, and its tests are collected only
when asked for."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid import backends

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "gpu_check"
sys.path.insert(0, str(TOOLS))
import pins  # noqa: E402  (tools/gpu_check is no package)


def pins_output(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, str(TOOLS / "pins.py"), *args], capture_output=True,
                            text=True, check=True)
    return result.stdout.split()


def test_the_check_installs_every_requirement_of_the_installed_project_at_its_pin():
    # The installed metadata is setup.py as pip read it: a second reading, not pins.py's own.
    declared = importlib.metadata.requires("megatron-hybrid")
    unconditional = {r.replace(" ", "") for r in declared if ";" not in r}
    assert unconditional and unconditional <= set(pins_output("requirements"))
    assert "pytest>=8.0" in pins_output("requirements")


@pytest.mark.parametrize("triton, mamba_ssm", [
    ("3.6.0", backends.MAMBA_SSM_VERSION),
    ("3.4.0", backends.MAMBA_SSM_VERSION_BEFORE_TRITON_3_5),
])
def test_the_check_builds_the_backends_kernel_releases(triton, mamba_ssm):
    assert pins_output("kernels", "--triton", triton) == [
        f"mamba-ssm=={mamba_ssm}", f"causal-conv1d=={backends.CAUSAL_CONV1D_VERSION}"]


def test_the_download_has_every_kernel_release_of_the_gpu_extra_and_the_backend():
    fetched = set(pins_output("kernels"))
    gpu_extra = {r.split(";")[0].replace(" ", "")
                 for r in importlib.metadata.requires("megatron-hybrid")
                 if re.search(r"extra\s*==\s*['\"]gpu['\"]", r) and r.startswith(("mamba", "causal"))}
    assert gpu_extra and gpu_extra <= fetched
    assert {f"mamba-ssm=={backends.MAMBA_SSM_VERSION_BEFORE_TRITON_3_5}",
            f"causal-conv1d=={backends.CAUSAL_CONV1D_VERSION}"} <= fetched


def test_setup_py_reading_fails_loudly_on_a_missing_name():
    with pytest.raises(KeyError, match="NO_SUCH_LIST"):
        pins.setup_py_literal("NO_SUCH_LIST")


@pytest.mark.parametrize("script", ["fetch_wheels.sh", "run.sh"])
def test_the_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(TOOLS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def collected(*args: str) -> set[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider", *args, "tests/gpu"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode in (0, 5), result.stdout[-3000:] + result.stderr[-3000:]  # 5: none
    return {line.split("[")[0] for line in result.stdout.splitlines() if "::" in line}


def test_gpu_tests_run_only_when_asked_and_the_two_phases_cover_them():
    every_test = {f"tests/gpu/{path.name}::{name}" for path in (ROOT / "tests/gpu").glob("test_*.py")
                  for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)}
    assert len(every_test) >= 6
    assert collected() == set()  # pytest.ini's addopts: the default run deselects them
    assert collected("-m", "gpu") == every_test
    # run.sh: the tests without causal_conv1d run while it builds, then the rest
    before_build = collected("-m", "gpu and not causal_conv1d")
    after_build = collected("-m", "gpu and causal_conv1d")
    assert before_build and after_build and before_build | after_build == every_test
    assert not before_build & after_build
