"""Pure-PyTorch CPU stand-ins for the CUDA-only ``mamba_ssm``, ``causal_conv1d`` and
``flash_attn`` packages.

Megatron-Core 0.16.1's ``ssm/mamba_mixer.py`` binds these at import time::

    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated
    from mamba_ssm.ops.triton.ssd_combined import (
        mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined)

and ModelOpt's megatron plugin does ``import mamba_ssm``; ``transformer/attention.py`` binds
``flash_attn``'s two paged-KV functions for dynamic inference. :func:`register` puts modules
with our implementations (``ssd``, ``conv1d``, ``norm_gated``, ``paged_attention``; same
signatures) under those names.
Importing this package registers nothing and does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

MARKER = "__megatron_hybrid_cpu_kernels__"

# Fake package -> version, and module -> (our module, names it exports). The versions are the
# lowest Megatron-Core 0.16.1's dynamic inference accepts (ssm/mamba_mixer.py:1253-1255,
# _check_mamba_sequence_packing_support; transformer/attention.py:926 for flash-attn), whose
# behaviour the kernels follow: varlen states, state slots of -1 skipped, paged KV caches.
_VERSIONS = {"mamba_ssm": "2.2.6.post3", "causal_conv1d": "1.5.3.post1", "flash_attn": "2.7.3"}
_MODULES = {
    "mamba_ssm": None,
    "mamba_ssm.ops": None,
    "mamba_ssm.ops.triton": None,
    "mamba_ssm.ops.triton.ssd_combined": (
        "ssd",
        ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined"),
    ),
    "mamba_ssm.ops.triton.selective_state_update": ("ssd", ("selective_state_update",)),
    "mamba_ssm.ops.triton.layernorm_gated": ("norm_gated", ("RMSNorm", "rmsnorm_fn")),
    "causal_conv1d": ("conv1d", ("causal_conv1d_fn", "causal_conv1d_update")),
    "causal_conv1d.causal_conv1d_varlen": ("conv1d", ("causal_conv1d_varlen_states",)),
    "flash_attn": ("paged_attention", ("flash_attn_varlen_func", "flash_attn_with_kvcache")),
}


def _is_ours(package: str) -> bool:
    return getattr(sys.modules.get(package), MARKER, False)


def _new_module(name: str, source: tuple[str, tuple[str, ...]] | None) -> types.ModuleType:
    is_package = any(other.startswith(name + ".") for other in _MODULES)
    module = types.ModuleType(name)
    # A real spec: importlib.util.find_spec (used by transformers) raises on __spec__ = None.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        module.__path__ = []
    setattr(module, MARKER, True)
    if name in _VERSIONS:
        module.__version__ = _VERSIONS[name]
    if source is not None:
        implementation = importlib.import_module(f"{__name__}.{source[0]}")
        for attribute in source[1]:
            setattr(module, attribute, getattr(implementation, attribute))
    return module


def register() -> tuple[str, ...]:
    """Install the CPU kernels as ``mamba_ssm`` / ``causal_conv1d`` / ``flash_attn`` where
    those are missing.

    Call before Megatron-Core or ModelOpt is imported: they bind the kernels (or a MagicMock
    ``RMSNormGated``) at import time. A package that is really installed is left alone.
    Idempotent. Returns the names of the real packages found (which were not replaced).
    """
    real = tuple(
        package
        for package in _VERSIONS
        if not _is_ours(package) and importlib.util.find_spec(package) is not None
    )
    for name, source in _MODULES.items():
        if name.split(".")[0] in real or name in sys.modules:
            continue
        module = _new_module(name, source)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return real
