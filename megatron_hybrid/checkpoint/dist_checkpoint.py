"""Checkpoints through Megatron-Core dist_checkpointing: reshardable across TP/PP/DP.

Layout of a run's ``checkpoints/`` folder::

    step_000100/        dist_checkpointing shards (model + optimizer), meta.json, config.yaml,
                        rng/rank_*.pt
    latest              the name of the newest complete checkpoint

A save is written under ``step_N.partial`` and renamed once every rank has finished, and only
then is ``latest`` replaced (atomically), so ``latest`` never names a partial checkpoint; a
process killed at any point of a save leaves the previous checkpoint loadable (the named
``reliability.save_point`` calls are where a test kills it). A full disk fails the save in one
line and removes its partial folder; ``latest`` keeps naming the previous checkpoint.
``meta.json`` holds the model config, pattern and tokenizer identity: a checkpoint alone
rebuilds its model.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_hybrid import backends, mcore, reliability

CHECKPOINT_IO_ERRORS = (Exception, CheckpointException)
"""What a failed dist_checkpointing read or write raises (torch's CheckpointException is a
BaseException, so ``except Exception`` alone would miss it)."""

# dist_checkpointing logs a failed shard write just before raising it; the raise is reported
# (in one line for a full disk), so the log line would only repeat it.
logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(
    logging.CRITICAL)

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
    state = _load(model_chunks, None, _require_complete(Path(directory)))
    (chunk,) = model_chunks
    _load_model_state(unwrap(chunk), state["model"])


EXTRA_STATE = "._extra_state"
"""The key suffix of a module's extra state: Transformer Engine's FP8 metadata, kept by its
modules only (Megatron-Core's local linears save an empty one for compatibility; its local
attention and norms none)."""


def _load(model_chunks: list, optimizer, directory: Path) -> dict:
    sharded = _sharded_state(model_chunks, optimizer, is_loading=True)
    try:
        # A checkpoint of the local spec has no extra state for Transformer Engine's attention
        # and norms: those modules start with fresh FP8 metadata (as Megatron-LM loads them).
        saved = _saved_keys(directory)
        sharded["model"] = {key: value for key, value in sharded["model"].items()
                            if not key.endswith(EXTRA_STATE) or value.key in saved}
        sharded["model"] = _adapters_to_load(sharded["model"], saved, directory)
        return mcore.dist_checkpointing.load(sharded, str(directory))
    except CHECKPOINT_IO_ERRORS as err:  # many types; all mean an unreadable folder
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{directory}: cannot be read ({first}): the checkpoint is "
                              f"damaged or incomplete; use another step_* folder") from None


SHAPE_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
                "mamba_num_groups", "vocab_size", "num_moe_experts", "moe_ffn_hidden_size",
                "moe_shared_expert_intermediate_size", "layer_overrides")
"""Model fields that set parameter shapes: a checkpoint loads only into equal ones."""


ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
"""The key suffixes of LoRA adapter tensors (``model/adapters.py``)."""


def _adapters_to_load(model_state: dict, saved: set[str], directory: Path) -> dict:
    """The model's sharded state to read: a checkpoint of the base model (no adapters) leaves
    the adapters at their initial values; one with adapters loads only into a model with them
    (its base weights alone would drop what was trained)."""
    # A Mamba in_proj's B is saved in pieces, like its weight (``...in_proj.lora_B.z``).
    checkpoint_has = any(re.search(r"\.lora_[AB](\.|$)", key) for key in saved)
    model_has = any(key.endswith(ADAPTER_SUFFIXES) for key in model_state)
    if checkpoint_has and not model_has:
        raise CheckpointError(f"{directory} holds LoRA adapters: build the model with the "
                              f"checkpoint's peft section (its meta.json), or export them "
                              f"with megatron-hybrid convert lora-to-peft")
    if model_has and not checkpoint_has:
        return {key: value for key, value in model_state.items()
                if not key.endswith(ADAPTER_SUFFIXES)}
    return model_state


def _saved_keys(directory: Path) -> set[str]:
    """The sharded keys a checkpoint holds (an object's key without its ``/shard_*``)."""
    from torch.distributed.checkpoint import FileSystemReader

    return {key.split("/shard_")[0]
            for key in FileSystemReader(str(directory)).read_metadata().state_dict_metadata}


def _load_model_state(model, state: dict) -> None:
    """``state`` into ``model``; only extra state (:data:`EXTRA_STATE`) may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Extra state may be absent, and adapters when _adapters_to_load kept them initial.
    missing = [key for key in missing
               if not key.endswith("_extra_state") and not key.endswith(ADAPTER_SUFFIXES)]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}: load it into the model it was "
                              f"saved from (see its config.yaml)")


def check_matches(directory: str | Path, *, model: dict, tokenizer: dict | None = None) -> None:
    """Refuse, in one line, a checkpoint of another model (or, given ``tokenizer``, trained
    with another tokenizer) before its tensors are read."""
    meta = read_meta(directory)
    saved = {"layer_overrides": {}, **meta["model"]}  # saved before per-layer sizes existed
    model = json.loads(json.dumps(model))  # as saved: JSON keys layer_overrides' indices as text
    differing = [f"model.{name} {model[name]!r} vs {saved.get(name)!r}" for name in SHAPE_FIELDS
                 if model[name] != saved.get(name)]
    if _layers(model["pattern"]) != _layers(saved["pattern"]):
        differing.append(f"model.pattern {model['pattern']!r} vs {saved['pattern']!r}")
    if differing:
        raise CheckpointError(f"{directory} holds another model (this run vs the checkpoint: "
                              f"{'; '.join(differing)}): set the model section as in its "
                              f"config.yaml, or give a checkpoint of this model")
    if tokenizer is not None and meta["tokenizer"] != tokenizer:
        raise CheckpointError(f"{directory} was trained with tokenizer {meta['tokenizer']}, this "
                              f"run uses {tokenizer}: set the tokenizer section as in its "
                              f"config.yaml, or start a new run (another output_dir)")


def _layers(pattern: str) -> str:
    """The layer sequence of a pattern, without its pipeline-stage boundaries."""
    return pattern.replace("|", "")


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
    """This rank's generators: the CPU one, the GPU one on cuda (dropout, init), and the
    tensor-parallel tracker's (CUDA generator states on cuda, CPU ones on the cpu backend)."""
    state = {"backend": backends.require_active(), "torch": torch.get_rng_state(),
             "tracker": mcore.tensor_parallel.get_cuda_rng_tracker().get_states()}
    if state["backend"] == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(backends.device())
    return state


def _set_rng_state(state: dict) -> None:
    """Restore :func:`_rng_state`'s generators; a checkpoint of the other backend (or of
    before the backend was saved) restores the CPU generator only: its tracker states are of
    the other device's generator type."""
    torch.set_rng_state(state["torch"])
    backend = state.get("backend", "cpu")
    if backend != backends.require_active():
        return
    mcore.tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if backend == "cuda":
        torch.cuda.set_rng_state(state["cuda"], backends.device())


LOW_SPACE_BYTES = 64 * 2**20
"""Free space under which a failed save is reported as a full disk: torch's zip writer turns
ENOSPC into a RuntimeError without an errno."""


def _disk_full(err: BaseException, directory: Path) -> bool:
    """Whether ``err`` comes from a full disk, also when wrapped by a checkpoint writer."""
    if shutil.disk_usage(directory).free < LOW_SPACE_BYTES:
        return True
    seen = [err]
    while seen:
        current = seen.pop()
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        seen += [e for e in (current.__cause__, current.__context__) if e is not None]
        seen += [e for e in getattr(current, "failures", {}).values()
                 if isinstance(e, BaseException)]
    return False


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
        reliability.save_point("started")
        try:
            self._write(partial, model_chunks, optimizer)
        except CHECKPOINT_IO_ERRORS as err:
            if _disk_full(err, self.root):
                shutil.rmtree(partial, ignore_errors=True)
                raise CheckpointError(
                    f"no space left on the device writing {partial}: free space or set "
                    f"output_dir to a larger disk; {self.root / LATEST} still names the "
                    f"previous checkpoint") from None
            raise
        dist.barrier()
        if _rank_zero():
            self._finish(partial, final, state, scheduler)
        dist.barrier()
        return final

    def _write(self, partial: Path, model_chunks: list, optimizer) -> None:
        mcore.dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False),
                                      str(partial))
        reliability.save_point("shards-written")
        (partial / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), partial / "rng" / f"rank_{dist.get_rank()}.pt")

    def _finish(self, partial: Path, final: Path, state: TrainState, scheduler) -> None:
        meta = {**self.meta, "train_state": asdict(state),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "world_size": dist.get_world_size()}
        (partial / META).write_text(json.dumps(meta, indent=2))
        (partial / "config.yaml").write_text(self.config_yaml)
        reliability.save_point("meta-written")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        reliability.save_point("renamed")
        pointer = self.root / f"{LATEST}.tmp"
        pointer.write_text(final.name)
        reliability.save_point("pointer-written")
        os.replace(pointer, self.root / LATEST)
        reliability.save_point("latest-replaced")
        self._prune(final)

    def _prune(self, latest: Path) -> None:
        """Keep the last ``keep_last`` checkpoints up to ``latest``; remove the rest: older ones,
        partial ones and complete ones a killed run left beyond ``latest`` (this run has
        diverged from them)."""
        steps = sorted(self.root.glob("step_*"))
        kept = [p for p in steps if p.suffix != ".partial" and p.name <= latest.name]
        for old in set(steps) - set(kept[-self.keep_last:]):
            reliability.save_point("pruning")
            shutil.rmtree(old)

    def resume(self, directory: Path, model_chunks: list, optimizer, scheduler) -> TrainState:
        """Restore model, optimizer, scheduler, RNG and data position from ``directory``."""
        meta = read_meta(directory)
        state = _load(model_chunks, optimizer, directory)
        (chunk,) = model_chunks
        _load_model_state(unwrap(chunk), state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and meta["scheduler"]:
            scheduler.load_state_dict(meta["scheduler"])
        rng_file = directory / "rng" / f"rank_{dist.get_rank()}.pt"
        if meta["world_size"] == dist.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return TrainState(**meta["train_state"])
