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
    """The cache rows a batch works on: all of them, or ``cache[indices]`` (continuous
    batching). An index of -1 marks a padding request (Megatron-Core's dynamic context,
    ``inference/contexts/attention_context/mamba_metadata.py:157`` and ``:183``): it reads
    row 0, and its result is never used."""
    return cache if indices is None else cache[indices.long().clamp(min=0)]


def write_rows(cache: torch.Tensor, indices: torch.Tensor | None, rows: torch.Tensor) -> None:
    """In-place inverse of :func:`read_rows`; padding requests (index -1) write nothing."""
    if indices is None:
        cache.copy_(rows)
    else:
        kept = indices >= 0
        cache.index_copy_(0, indices[kept].long(), rows[kept].to(cache.dtype))
