"""Helpers shared by the CPU kernels."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32 (like the CUDA kernels' accumulators); fp64 stays fp64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def read_rows(cache: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """The cache rows a batch works on: all of them, or ``cache[indices]`` (continuous batching)."""
    return cache if indices is None else cache[indices.long()]


def write_rows(cache: torch.Tensor, indices: torch.Tensor | None, rows: torch.Tensor) -> None:
    """In-place inverse of :func:`read_rows`."""
    if indices is None:
        cache.copy_(rows)
    else:
        cache.index_copy_(0, indices.long(), rows.to(cache.dtype))
