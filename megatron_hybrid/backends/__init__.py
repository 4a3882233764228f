"""Backend selection: ``cuda`` (Transformer Engine + mamba_ssm on GPUs) or ``cpu`` (gloo +
pure-PyTorch kernels). Nothing is patched until :func:`install` is called.

Megatron-Core must be imported only after a backend is installed: the cpu backend has to
register its Mamba kernels under the ``mamba_ssm`` names before Megatron-Core binds them.
"""

from __future__ import annotations

import getpass
import importlib
import importlib.metadata
import importlib.util
import os
import tempfile

BACKENDS = ("cpu", "cuda")

# The kernel releases the cuda backend is built with (Dockerfile, setup.py's gpu extra).
MAMBA_SSM_VERSION = "2.3.2.post1"
"""2.3.0 is the first release that imports under transformers 5 (2.2.x imports
GreedySearchDecoderOnlyOutput, which transformers 5 removed); 2.3.2.post1 declares triton >= 3.5."""
MAMBA_SSM_VERSION_BEFORE_TRITON_3_5 = "2.3.0"
"""For a triton older than 3.5: 2.3.0 declares no triton floor, and its Mamba-2 kernels differ
from 2.3.2.post1's by one dtype cast in the chunk-scan backward."""
CAUSAL_CONV1D_VERSION = "1.5.3.post1"

# What Megatron-Core 0.16.1 (ssm/mamba_mixer.py) and ModelOpt 0.43 (nas/plugins/megatron.py)
# import, as (module, attribute that must not be None): mamba_mixer swallows ImportErrors, so a
# broken package shows up only later as a None kernel or as ModelOpt's HAS_MAMBA False.
_IMPORT_CHAINS = {
    "mamba_ssm": (
        # The package itself first: after it fails once, its half-imported submodules import.
        ("mamba_ssm", None),
        ("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined"),
        ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
        ("mamba_ssm.ops.triton.layernorm_gated", "RMSNorm"),
    ),
    "causal_conv1d": (
        ("causal_conv1d", "causal_conv1d_fn"),
        ("causal_conv1d.causal_conv1d_varlen", "causal_conv1d_varlen_states"),
        ("causal_conv1d_cuda", None),
    ),
    "transformer_engine": (("transformer_engine.pytorch", None),),
}

_active: str | None = None


class BackendError(RuntimeError):
    """The requested backend cannot run on this machine; the message says what to do."""


def _gpu_packages(need_transformer_engine: bool) -> tuple[str, ...]:
    return tuple(name for name in _IMPORT_CHAINS
                 if need_transformer_engine or name != "transformer_engine")


def missing_gpu_packages(need_transformer_engine: bool = True) -> list[str]:
    """The cuda backend's packages that are not installed at all (imports nothing)."""
    return [name for name in _gpu_packages(need_transformer_engine)
            if importlib.util.find_spec(name) is None]


def mamba_ssm_version_for(triton_version: str | None) -> str:
    """The mamba-ssm release to install beside ``triton_version`` (None: not installed)."""
    from packaging.version import Version

    if triton_version is not None and Version(triton_version) < Version("3.5"):
        return MAMBA_SSM_VERSION_BEFORE_TRITON_3_5
    return MAMBA_SSM_VERSION


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_hint(package: str) -> str:
    """The command that puts ``package`` right for the cuda backend."""
    if package == "mamba_ssm":
        version = mamba_ssm_version_for(_installed_version("triton"))
        return f"pip install --no-build-isolation --no-deps mamba-ssm=={version}"
    if package == "causal_conv1d":
        return f"pip install --no-build-isolation --no-deps causal-conv1d=={CAUSAL_CONV1D_VERSION}"
    # transformer_engine: its torch part is an sdist that needs CUDA to build.
    return ("use NVIDIA's PyTorch container, which ships it, or pip install "
            "'megatron-hybrid[gpu]'; model.transformer_impl=local runs without it")


def import_problem(module: str, error: Exception, hint: str) -> str:
    """One line: the module that failed, the real error (its own lines joined) and the fix."""
    message = " ".join(str(error).split())
    return f"{module}: {type(error).__name__}: {message}: {hint}"


def _first_import_problem(package: str) -> str | None:
    for module_name, attribute in _IMPORT_CHAINS[package]:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # a broken extension raises OSError or RuntimeError too
            return import_problem(module_name, error, install_hint(package))
        if attribute is not None and getattr(module, attribute, None) is None:
            return import_problem(module_name, ImportError(f"{attribute} is None"),
                                  install_hint(package))
    return None


def cuda_import_problems(need_transformer_engine: bool = True) -> list[str]:
    """Import what the cuda backend's Megatron-Core and ModelOpt layers import and return one
    line per package that fails (empty: all good). Importing is the only reliable test: a
    package can be installed and still fail (mamba-ssm 2.2.x under transformers 5)."""
    missing = missing_gpu_packages(need_transformer_engine)
    problems = [_not_installed(package) for package in missing]
    for package in _gpu_packages(need_transformer_engine):
        if package not in missing and (problem := _first_import_problem(package)):
            problems.append(problem)
    return problems


def _not_installed(package: str) -> str:
    return f"{package}: not installed: {install_hint(package)}"


def _check_requested(requested: str) -> None:
    if requested not in ("auto",) + BACKENDS:
        raise BackendError(f"unknown backend {requested!r}: choose one of auto, cpu, cuda")


def choose(requested: str, *, cuda_available: bool, missing_packages: list[str]) -> str:
    """Pure selection logic: ``auto`` means cuda when a GPU is visible and nothing is missing.

    ``missing_packages`` is what keeps the cuda backend from running: package names
    (:func:`missing_gpu_packages`) or the one-line reports of :func:`cuda_import_problems`.
    """
    _check_requested(requested)
    if requested == "auto":
        return "cuda" if cuda_available and not missing_packages else "cpu"
    if requested == "cuda" and not cuda_available:
        raise BackendError("backend=cuda needs a GPU and none is visible: use backend=cpu")
    if requested == "cuda" and missing_packages:
        reports = [_not_installed(entry) if entry in _IMPORT_CHAINS else entry
                   for entry in missing_packages]
        raise BackendError(f"backend=cuda: {'; '.join(reports)}")
    return requested


PINNED_SET_WARNINGS = (
    # Deprecations and version notes that the pinned Megatron-Core and ModelOpt raise about the
    # pinned torch and transformers on every checkpoint load or prune: nothing to act on.
    "`load_state_dict` is deprecated",
    r"`torch.distributed.\w+` is deprecated",
    "transformers version .* is not tested with nvidia-modelopt",
)


def install(requested: str = "auto", *, need_transformer_engine: bool = True) -> str:
    """Install a backend once per process and return its name (``auto`` keeps one installed).

    ``need_transformer_engine=False`` (model.transformer_impl=local) lets cuda run without it.
    """
    global _active
    import warnings

    import torch

    _check_requested(requested)
    if _active is not None:
        if requested not in ("auto", _active):
            raise BackendError(f"backend {_active!r} is already installed in this process; "
                               f"start a new process for backend={requested}")
        return _active
    cuda_available = torch.cuda.is_available()
    problems = (cuda_import_problems(need_transformer_engine)
                if cuda_available and requested != "cpu" else [])
    name = choose(requested, cuda_available=cuda_available, missing_packages=problems)
    if name == "cpu" and problems:
        warnings.warn(f"backend=auto chose cpu although a GPU is visible: {'; '.join(problems)}",
                      stacklevel=2)
    for message in PINNED_SET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    separate_compile_caches(os.environ)
    if name == "cpu":
        from megatron_hybrid.backends import cpu

        cpu.install()
    _active = name
    return name


def _inductor_cache_root(environ) -> str:
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")


def _triton_cache_root(environ) -> str:
    return os.path.join(environ.get("TRITON_HOME", os.path.expanduser("~")), ".triton", "cache")


COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": _inductor_cache_root,
                  "TRITON_CACHE_DIR": _triton_cache_root}
"""Kernel caches -> their default root: Megatron-Core's fused functions are torch.compile'd
(inductor), the Mamba kernels are Triton's."""


def separate_compile_caches(environ) -> None:
    """Give this rank its own kernel caches (:data:`COMPILE_CACHES`): ranks that compile at the
    same time in one cache load each other's half-written files. Set here, in the process,
    because torchrun starts all its workers with one environment; a cache the user set is
    kept."""
    rank = environ.get("RANK")
    if rank is None:
        return
    for variable, default_root in COMPILE_CACHES.items():
        if variable not in environ:
            environ[variable] = os.path.join(default_root(environ), f"rank{rank}")


def active() -> str | None:
    """The installed backend's name, or None when none is installed yet."""
    return _active


def device():
    """The ``torch.device`` this process's model, batches and loss totals live on: the CPU on
    the cpu backend, the rank's GPU (``torch.cuda.set_device`` by the process groups) on cuda.
    Project code names its device through this, never through ``"cuda"``."""
    import torch

    if require_active() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict) -> dict:
    """``batch``'s tensors on :func:`device` (asynchronously from pinned memory on GPUs)."""
    target = device()
    return {key: value.to(target, non_blocking=True) for key, value in batch.items()}


def pins_memory() -> bool:
    """Whether data loaders should pin their batches (a GPU copies pinned memory async)."""
    return _active == "cuda"


def require_active() -> str:
    if _active is None:
        raise BackendError("no backend installed: call megatron_hybrid.backends.install() "
                           "before importing Megatron-Core")
    return _active
