"""Model weights through Megatron-Core dist_checkpointing (reshardable across TP/PP)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_hybrid import mcore


def unwrap(chunk):
    """The Megatron model inside a DDP wrapper (or the model itself)."""
    return getattr(chunk, "module", chunk)


def _sharded_model_state(model_chunks: list) -> dict:
    (chunk,) = model_chunks  # one chunk per stage (no virtual pipeline for hybrid models)
    return {"model": unwrap(chunk).sharded_state_dict()}


def save_weights(model_chunks: list, directory: str | Path) -> None:
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    mcore.dist_checkpointing.save(_sharded_model_state(model_chunks), str(directory))


def load_weights(model_chunks: list, directory: str | Path) -> None:
    """Load weights saved with any TP/PP layout into this layout's model."""
    state = mcore.dist_checkpointing.load(_sharded_model_state(model_chunks), str(directory))
    (chunk,) = model_chunks
    unwrap(chunk).load_state_dict(state["model"])
