"""The cuda backend's kernel packages, proved on the CPU.

Each mamba-ssm release is built from its sdist without its CUDA extension (the Python code is
what breaks under transformers 5) into a folder of its own, never into the venv: the cpu
backend defers to a real mamba_ssm. A fresh process with empty stand-ins for the two compiled
extensions then imports Megatron-Core and ModelOpt the way a training process does, and asks
the backend's import probe. The probe's one-line reports are tested with tiny fake packages.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid import backends
from megatron_hybrid.data.cache import resolve_cache_dir, temporary_sibling

ROOT = Path(__file__).resolve().parents[2]
BROKEN_MAMBA_SSM = "2.2.6.post3"  # the Dockerfile's pin before 2.3
# Both setup.py files compile nothing with SKIP and look for no prebuilt wheel with FORCE.
PYTHON_ONLY_BUILD = {"MAMBA_SKIP_CUDA_BUILD": "TRUE", "MAMBA_FORCE_BUILD": "TRUE",
                     "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE", "CAUSAL_CONV1D_FORCE_BUILD": "TRUE",
                     "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}


def run(command: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def sdist(name: str, version: str) -> Path:
    """The sdist from the package registry, kept in the project's cache folder."""
    folder = resolve_cache_dir() / "kernel-sdists"
    path = folder / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not path.exists():
        download = temporary_sibling(folder / name)
        # Without build isolation: the sdists' metadata step imports torch.
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
             "--no-build-isolation", "--dest", str(download), f"{name}=={version}"],
            PYTHON_ONLY_BUILD)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(download / path.name, path)
        shutil.rmtree(download)
    return path


def install_python_part(name: str, version: str, target: Path) -> Path:
    """What the Dockerfile's kernel install does, minus the CUDA compile, into ``target``."""
    run([sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation",
         "--no-deps", "--target", str(target), str(sdist(name, version))], PYTHON_ONLY_BUILD)
    return target


@pytest.fixture(scope="module")
def causal_conv1d_and_stand_ins(tmp_path_factory) -> list[Path]:
    """causal-conv1d's Python part and empty modules under the compiled extensions' names
    (mamba_ssm imports selective_scan_cuda, Mamba-1's scan, unguarded)."""
    stand_ins = tmp_path_factory.mktemp("stand_ins")
    for extension in ("selective_scan_cuda", "causal_conv1d_cuda"):
        (stand_ins / f"{extension}.py").write_text('"""Stand-in: nothing here is called."""\n')
    target = install_python_part("causal-conv1d", backends.CAUSAL_CONV1D_VERSION,
                                 tmp_path_factory.mktemp("causal_conv1d"))
    return [target, stand_ins]


# Megatron-Core and ModelOpt first, as a training process without the probe imports them; then
# the cuda backend's install, which probes (the GPU check is not what is tested here).
IMPORT_CHAIN = """
import json, torch
from megatron.core.ssm import mamba_mixer
from modelopt.torch.nas.plugins import megatron as modelopt_megatron
report = {"have_mamba_ssm": mamba_mixer.HAVE_MAMBA_SSM,
          "selective_state_update": mamba_mixer.selective_state_update is not None,
          "causal_conv1d_fn": mamba_mixer.causal_conv1d_fn is not None,
          "has_mamba": modelopt_megatron.HAS_MAMBA}
try:
    import mamba_ssm
    report["mamba_ssm"] = mamba_ssm.__version__
except ImportError as error:
    report["mamba_ssm"] = str(error)
from megatron_hybrid import backends
torch.cuda.is_available = lambda: True
try:
    report["backend"] = backends.install("cuda", need_transformer_engine=False)
except backends.BackendError as error:
    report["backend"] = str(error)
print(json.dumps(report))
"""


@pytest.mark.parametrize("version", [backends.MAMBA_SSM_VERSION, BROKEN_MAMBA_SSM])
def test_megatron_core_and_modelopt_get_the_mamba_kernels(version, causal_conv1d_and_stand_ins,
                                                         tmp_path):
    target = install_python_part("mamba-ssm", version, tmp_path / "mamba_ssm")
    assert (target / f"mamba_ssm-{version}.dist-info").is_dir()
    path = os.pathsep.join(map(str, [target, *causal_conv1d_and_stand_ins, ROOT]))
    report = json.loads(run([sys.executable, "-c", IMPORT_CHAIN], {"PYTHONPATH": path},
                            cwd=tmp_path).splitlines()[-1])
    assert report["causal_conv1d_fn"]
    works = report["selective_state_update"] and report["has_mamba"]
    if version == backends.MAMBA_SSM_VERSION:
        assert works, report
        assert report["mamba_ssm"] == version and report["backend"] == "cuda"
        return
    assert not works, report
    # The silent failure the probe exists for: Megatron-Core says it has mamba_ssm (the failed
    # package left its submodules behind) while one kernel is None and ModelOpt has no Mamba.
    assert report["have_mamba_ssm"] and not report["selective_state_update"]
    assert not report["has_mamba"]
    assert "cannot import name 'GreedySearchDecoderOnlyOutput'" in report["mamba_ssm"]
    assert re.fullmatch(
        r"backend=cuda: mamba_ssm: ImportError: cannot import name "
        r"'GreedySearchDecoderOnlyOutput' from 'transformers\.generation' \([^)]*\): "
        + re.escape(backends.install_hint("mamba_ssm")), report["backend"]), report["backend"]


# -- the probe's reports, from fake packages ------------------------------------------------

FAKE_PACKAGES = {  # each fails differently; the error's own line break must not survive
    "mamba_ssm/__init__.py": "raise ImportError(\"cannot import name 'Gone' from\\n 'there'\")",
    "causal_conv1d/__init__.py": "causal_conv1d_fn = object()",
    "causal_conv1d/causal_conv1d_varlen.py": "causal_conv1d_varlen_states = None",
    "transformer_engine/__init__.py": "",
    "transformer_engine/pytorch.py": "raise OSError('libcudart.so.12: cannot open shared object')",
}


def test_probe_reports_one_line_per_broken_package(tmp_path):
    for relative, source in FAKE_PACKAGES.items():
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_text(source)
    code = ("import json; from megatron_hybrid.backends import cuda_import_problems as probe\n"
            "print(json.dumps([probe(need_transformer_engine=True), probe(False)]))")
    with_te, without_te = json.loads(run([sys.executable, "-c", code],
                                         {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}))
    conv_fix = ("pip install --no-build-isolation --no-deps "
                f"causal-conv1d=={backends.CAUSAL_CONV1D_VERSION}")
    assert without_te == [
        "mamba_ssm: ImportError: cannot import name 'Gone' from 'there': "
        + backends.install_hint("mamba_ssm"),
        "causal_conv1d.causal_conv1d_varlen: ImportError: causal_conv1d_varlen_states is None: "
        + conv_fix,
    ]
    assert with_te == [*without_te,
                       "transformer_engine.pytorch: OSError: libcudart.so.12: cannot open shared "
                       "object: " + backends.install_hint("transformer_engine")]


def test_a_package_that_is_not_installed_is_named_with_its_fix():
    with pytest.raises(backends.BackendError) as raised:
        backends.choose("cuda", cuda_available=True, missing_packages=["transformer_engine"])
    assert str(raised.value) == (
        "backend=cuda: transformer_engine: not installed: use NVIDIA's PyTorch container, which "
        "ships it, or pip install 'megatron-hybrid[gpu]'; model.transformer_impl=local runs "
        "without it")


def test_forced_cuda_fails_with_the_probe_line():
    line = backends.import_problem("causal_conv1d_cuda", ModuleNotFoundError("No module named "
                                   "'causal_conv1d_cuda'"), backends.install_hint("causal_conv1d"))
    with pytest.raises(backends.BackendError) as raised:
        backends.choose("cuda", cuda_available=True, missing_packages=[line])
    assert str(raised.value) == f"backend=cuda: {line}"
    assert "\n" not in str(raised.value)
    assert backends.choose("auto", cuda_available=True, missing_packages=[line]) == "cpu"


@pytest.mark.parametrize("triton, mamba_ssm", [
    ("3.3.0+git4eff9cba", backends.MAMBA_SSM_VERSION_BEFORE_TRITON_3_5),
    ("3.4.0", backends.MAMBA_SSM_VERSION_BEFORE_TRITON_3_5),
    ("3.5.0", backends.MAMBA_SSM_VERSION),
    ("3.6.0", backends.MAMBA_SSM_VERSION),
    (None, backends.MAMBA_SSM_VERSION),
])
def test_the_mamba_ssm_release_follows_triton(triton, mamba_ssm):
    assert backends.mamba_ssm_version_for(triton) == mamba_ssm


def test_backend_dockerfile_and_setup_py_name_the_same_kernels():
    assignments = {getattr(node.targets[0], "id", None): node.value
                   for node in ast.parse((ROOT / "setup.py").read_text()).body
                   if isinstance(node, ast.Assign)}
    gpu_extra = ast.literal_eval(assignments["EXTRAS_REQUIRE"])["gpu"]
    dockerfile_args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(),
                                      re.MULTILINE))
    assert f"mamba-ssm=={backends.MAMBA_SSM_VERSION}" in gpu_extra
    assert f"causal-conv1d=={backends.CAUSAL_CONV1D_VERSION}" in gpu_extra
    assert dockerfile_args["MAMBA_SSM_VERSION"] == backends.MAMBA_SSM_VERSION
    assert (dockerfile_args["MAMBA_SSM_VERSION_BEFORE_TRITON_3_5"]
            == backends.MAMBA_SSM_VERSION_BEFORE_TRITON_3_5)
    assert dockerfile_args["CAUSAL_CONV1D_VERSION"] == backends.CAUSAL_CONV1D_VERSION
