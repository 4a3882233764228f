"""Checkpoints through Megatron-Core dist_checkpointing: reshardable across TP/PP/DP.

Layout of a run's ``checkpoints/`` folder::

    step_000100/        dist_checkpointing shards (model + optimizer), meta.json, config.yaml,
                        rng/rank_*.pt
    latest              the name of the newest complete checkpoint

A save is written under ``step_N.partial`` and renamed once every rank has finished, and only
then is ``latest`` replaced (atomically), so ``latest`` never names a partial checkpoint.
``meta.json`` holds the model config, pattern and tokenizer identity: a checkpoint alone
rebuilds its model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid import mcore

LATEST = "latest"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or of another model; the message names the path."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    consumed_samples: int = 0
    """Global samples consumed: the data position."""
    tokens: int = 0
    """Loss tokens trained on."""


def unwrap(chunk):
    """The Megatron model inside a DDP wrapper (or the model itself)."""
    return getattr(chunk, "module", chunk)


def _model_state(model_chunks: list) -> dict:
    (chunk,) = model_chunks  # one chunk per stage (no virtual pipeline for hybrid models)
    return unwrap(chunk).sharded_state_dict()


def _sharded_state(model_chunks: list, optimizer, *, is_loading: bool) -> dict:
    state = {"model": _model_state(model_chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


def _rank_zero() -> bool:
    return dist.get_rank() == 0


def save_weights(model_chunks: list, directory: str | Path) -> None:
    """Model weights only (e.g. an initial checkpoint shared by several layouts)."""
    directory = Path(directory)
    if _rank_zero():
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    mcore.dist_checkpointing.save(_sharded_state(model_chunks, None, is_loading=False),
                                  str(directory))


def load_weights(model_chunks: list, directory: str | Path) -> None:
    """Load weights saved with any TP/PP layout into this layout's model."""
    state = mcore.dist_checkpointing.load(_sharded_state(model_chunks, None, is_loading=True),
                                          str(_require_complete(Path(directory))))
    (chunk,) = model_chunks
    unwrap(chunk).load_state_dict(state["model"])


def read_meta(directory: str | Path) -> dict:
    return json.loads((_require_complete(Path(directory)) / META).read_text())


def _require_complete(directory: Path) -> Path:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist: check the path")
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(f"{directory} is not a complete dist_checkpointing checkpoint "
                              "(no metadata.json): point to a step_* folder of a finished save")
    return directory


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "tracker": mcore.tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    mcore.tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class Checkpointer:
    """Decides when to save, writes complete checkpoints, keeps the last K, resumes."""

    def __init__(self, run_dir: str | Path, *, save_interval: int | None, keep_last: int,
                 meta: dict, config_yaml: str):
        self.root = Path(run_dir) / "checkpoints"
        self.save_interval = save_interval
        self.keep_last = keep_last
        self.meta = meta
        self.config_yaml = config_yaml

    def should_save(self, step: int, *, final: bool) -> bool:
        return final or bool(self.save_interval and step % self.save_interval == 0)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        return _require_complete(self.root / pointer.read_text().strip())

    def save(self, state: TrainState, model_chunks: list, optimizer, scheduler) -> Path:
        name = f"step_{state.step:06d}"
        final, partial = self.root / name, self.root / f"{name}.partial"
        if _rank_zero():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        mcore.dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False),
                                      str(partial))
        (partial / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), partial / "rng" / f"rank_{dist.get_rank()}.pt")
        dist.barrier()
        if _rank_zero():
            self._finish(partial, final, state, scheduler)
        dist.barrier()
        return final

    def _finish(self, partial: Path, final: Path, state: TrainState, scheduler) -> None:
        meta = {**self.meta, "train_state": asdict(state),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "world_size": dist.get_world_size()}
        (partial / META).write_text(json.dumps(meta, indent=2))
        (partial / "config.yaml").write_text(self.config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        pointer = self.root / f"{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.root / LATEST)
        self._prune()

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(".partial"))
        for old in complete[: max(len(complete) - self.keep_last, 0)]:
            shutil.rmtree(old)

    def resume(self, directory: Path, model_chunks: list, optimizer, scheduler) -> TrainState:
        """Restore model, optimizer, scheduler, RNG and data position from ``directory``."""
        meta = read_meta(directory)
        state = mcore.dist_checkpointing.load(
            _sharded_state(model_chunks, optimizer, is_loading=True), str(directory))
        (chunk,) = model_chunks
        unwrap(chunk).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and meta["scheduler"]:
            scheduler.load_state_dict(meta["scheduler"])
        rng_file = directory / "rng" / f"rank_{dist.get_rank()}.pt"
        if meta["world_size"] == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return TrainState(**meta["train_state"])
