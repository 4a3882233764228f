"""Backend selection: ``cuda`` (Transformer Engine + mamba_ssm on GPUs) or ``cpu`` (gloo +
pure-PyTorch kernels). Nothing is patched until :func:`install` is called.

Megatron-Core must be imported only after a backend is installed: the cpu backend has to
register its Mamba kernels under the ``mamba_ssm`` names before Megatron-Core binds them.
"""

from __future__ import annotations

import importlib.util

BACKENDS = ("cpu", "cuda")
_GPU_PACKAGES = ("transformer_engine", "mamba_ssm", "causal_conv1d")

_active: str | None = None


class BackendError(RuntimeError):
    """The requested backend cannot run on this machine; the message says what to do."""


def missing_gpu_packages() -> list[str]:
    return [name for name in _GPU_PACKAGES if importlib.util.find_spec(name) is None]


def choose(requested: str, *, cuda_available: bool, missing_packages: list[str]) -> str:
    """Pure selection logic: ``auto`` means cuda when a GPU and its packages are present."""
    if requested not in ("auto",) + BACKENDS:
        raise BackendError(f"unknown backend {requested!r}: choose one of auto, cpu, cuda")
    if requested == "auto":
        return "cuda" if cuda_available and not missing_packages else "cpu"
    if requested == "cuda" and not cuda_available:
        raise BackendError("backend=cuda needs a GPU and none is visible: use backend=cpu")
    if requested == "cuda" and missing_packages:
        raise BackendError(
            f"backend=cuda needs {', '.join(missing_packages)}: "
            "pip install 'megatron-hybrid[gpu]' (or use NVIDIA's PyTorch container)"
        )
    return requested


PINNED_SET_WARNINGS = (
    # Deprecations and version notes that the pinned Megatron-Core and ModelOpt raise about the
    # pinned torch and transformers on every checkpoint load or prune: nothing to act on.
    "`load_state_dict` is deprecated",
    r"`torch.distributed.\w+` is deprecated",
    "transformers version .* is not tested with nvidia-modelopt",
)


def install(requested: str = "auto") -> str:
    """Install a backend once per process and return its name."""
    global _active
    import warnings

    import torch

    name = choose(requested, cuda_available=torch.cuda.is_available(),
                  missing_packages=missing_gpu_packages())
    if _active is not None:
        if _active != name:
            raise BackendError(f"backend {_active!r} is already installed in this process; "
                               f"start a new process for backend={name}")
        return _active
    for message in PINNED_SET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if name == "cpu":
        from megatron_hybrid.backends import cpu

        cpu.install()
    _active = name
    return name


def active() -> str | None:
    """The installed backend's name, or None when none is installed yet."""
    return _active


def require_active() -> str:
    if _active is None:
        raise BackendError("no backend installed: call megatron_hybrid.backends.install() "
                           "before importing Megatron-Core")
    return _active
