"""Model weights in Megatron dist_checkpointing format, written and read a few tensors at a time.

Both directions work through the model built on the meta device (TP=1, PP=1: shapes, no
weights), so every sharded key, Megatron-Core's own tensor splits (a Mamba ``in_proj`` is saved
as ``.z .x .B .C .dt``, ``conv1d`` as ``.x .B .C``) and its Transformer-Engine-compatible names
(a Mamba layer's norm is saved as ``mixer.in_proj.layer_norm_weight``) come from Megatron-Core
itself, and the result is exactly what ``checkpoint.save_weights`` writes and
``checkpoint.load_weights`` reads, in any TP/PP layout.

- :func:`save_model` runs ``dist_checkpointing.save`` on the meta model with a save strategy
  that asks for each tensor only when PyTorch's checkpoint writer reaches it. The writer puts
  every tensor in a file of its own: PyTorch's ``FileSystemWriter`` keeps all tensors of one
  file alive until that file is closed, so one file per tensor is what bounds memory to about
  one tensor (the torch_dist format does not care how tensors are spread over files).
- :func:`open_checkpoint` checks that a checkpoint holds exactly the tensors of the model its
  config describes, then :meth:`CheckpointReader.load` loads named parameters in full (all
  TP/PP/EP shards joined) through ``dist_checkpointing.load``.

"Parameters" here are the model's tensors a checkpoint holds: its parameters and its
persistent buffers (an MoE router's ``expert_bias``; its ``local_tokens_per_expert`` count is
not persistent and not saved), not the ``_extra_state`` slots.

Needs an installed cpu backend (meta-device builds) and runs in a single process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.distributed import checkpoint as torch_checkpoint
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_hybrid import mcore
from megatron_hybrid.model import params
from megatron_hybrid.model.config import ModelConfig, PeftConfig
from megatron_hybrid.model.hf_mapping import ConversionError, preview

OPTIMIZER_KEY_PREFIX = "optimizer."
"""Megatron-Core names optimizer-state tensors ``optimizer.state.<moment>.<parameter key>``."""


# The sharded-tensor types, and the torch_dist save strategy, its save planner and its
# translation of Megatron's sharded state dict into PyTorch's.
_mapping, _torch_dist = mcore.dist_checkpointing_mapping, mcore.dist_checkpointing_torch


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_model(cfg: ModelConfig, directory, *, dtypes: dict[str, torch.dtype],
               produce: Callable[[str], torch.Tensor]) -> None:
    """Write the weights of ``cfg``'s model to ``directory`` (an existing, empty directory).

    ``produce(name)`` returns parameter ``name`` (a :func:`saved_tensors` name) in full, with
    dtype ``dtypes[name]``; it is called when the writer reaches that parameter (once: the
    pieces Megatron splits a parameter into are written one after another), and the tensor is
    dropped when the writer moves on.
    """
    with _meta_model(cfg, None) as model:
        _set_dtypes(model, dtypes)
        strategy = _StreamingSave(_Materializer(model, produce))
        mcore.dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory),
                                      sharded_strategy=strategy)


def saved_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` a checkpoint holds, by ``state_dict`` name: parameters and
    persistent buffers (the objects themselves), without the ``_extra_state`` slots."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
            if not name.endswith("._extra_state")}


def _set_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    tensors = saved_tensors(model)
    if tensors.keys() != dtypes.keys():
        raise ConversionError(
            f"dtypes given for {preview(sorted(dtypes.keys() - tensors.keys()))} that the model "
            f"lacks, none for {preview(sorted(tensors.keys() - dtypes.keys()))}")
    for name, tensor in tensors.items():
        tensor.data = torch.empty(tensor.shape, dtype=dtypes[name], device="meta")


def _storage_id(tensor: torch.Tensor) -> int:
    """The same for a tensor and every view of it (meta tensors have storages but no data)."""
    return tensor.untyped_storage()._cdata


class _Materializer:
    """Turns the writer's meta placeholders into real tensors: a placeholder is a parameter of
    the meta model or a view of one (Megatron's splits), so the same view is cut out of the
    produced parameter. The last parameter is kept while its splits are written."""

    def __init__(self, model: torch.nn.Module, produce: Callable[[str], torch.Tensor]):
        self.params = {_storage_id(p): (name, p) for name, p in saved_tensors(model).items()}
        self.produce = produce
        self.current: tuple[str, torch.Tensor] | None = None

    def __call__(self, placeholder: torch.Tensor) -> torch.Tensor:
        name, param = self.params[_storage_id(placeholder)]
        if self.current is None or self.current[0] != name:
            self.current = None  # free the previous parameter before producing the next
            self.current = (name, self._produce(name, param))
        # A view smaller than its parameter is copied by PyTorch's writer before it is saved.
        return self.current[1].as_strided(placeholder.shape, placeholder.stride(),
                                          placeholder.storage_offset())

    def _produce(self, name: str, param: torch.Tensor) -> torch.Tensor:
        tensor = self.produce(name)
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise ConversionError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the model "
                                  f"needs {tuple(param.shape)} {param.dtype}")
        tensor = tensor.contiguous()
        # as_strided counts offsets from the storage's start: a view (one expert's rows of a
        # stacked tensor) gets a storage of its own.
        return tensor if tensor.storage_offset() == 0 else tensor.clone()


class _LazySavePlanner(_torch_dist.MCoreSavePlanner):
    """Megatron's save planner, producing each tensor when the writer asks for it."""

    def __init__(self, materialize: _Materializer):
        super().__init__(flatten_state_dict=False)
        self.materialize = materialize

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        return data if write_item.type == WriteItemType.BYTE_IO else self.materialize(data)


class _StreamingSave(_torch_dist.TorchDistSaveShardedStrategy):
    """Megatron's torch_dist save strategy, synchronous, lazy and with one file per tensor."""

    def __init__(self, materialize: _Materializer):
        super().__init__("torch_dist", 1)
        self.materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        by_key, _, _ = _torch_dist._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        with _one_line_errors(f"writing {checkpoint_dir}"):
            torch_checkpoint.save(
                _torch_dist.mcore_to_pyt_state_dict(by_key, False),
                storage_writer=torch_checkpoint.FileSystemWriter(checkpoint_dir,
                                                                 single_file_per_rank=False),
                planner=_LazySavePlanner(self.materialize))


@contextlib.contextmanager
def _one_line_errors(action: str, hint: str = ""):
    """PyTorch's checkpoint API wraps each rank's exception, traceback included, in a
    CheckpointException: raise this (single) rank's error instead, as one line."""
    try:
        yield
    except CheckpointException as err:
        (original, _), *_ = err.failures.values()
        if isinstance(original, ConversionError):
            raise original from None
        detail = ": ".join([type(original).__name__, *str(original).splitlines()[:1]])
        raise ConversionError(f"{action} failed ({detail}){hint}") from None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class CheckpointReader:
    """Full parameters of a checkpoint's model, loaded a few at a time (see open_checkpoint)."""

    def __init__(self, directory, cfg: ModelConfig, model: torch.nn.Module):
        self.directory = str(directory)
        tensors = saved_tensors(model)
        self.entries = {name: entry for name, entry in model.sharded_state_dict().items()
                        if name in tensors}
        saved = mcore.dist_checkpointing.load_tensors_metadata(self.directory)
        expected = {piece.key: piece for entry in self.entries.values()
                    for piece in _pieces(entry)}
        _check_saved_tensors(saved, expected, directory, cfg)
        self.dtypes = {name: saved[_pieces(entry)[0].key].dtype
                       for name, entry in self.entries.items()}
        """Parameter name -> the dtype it was saved in."""
        self.shapes = {name: tuple(entry.data.shape) for name, entry in self.entries.items()}
        """Parameter name -> its full (TP=1) shape."""

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Parameters ``names`` in full, in their saved dtype."""
        request = {name: _with_data(self.entries[name],
                                    torch.empty(self.shapes[name], dtype=self.dtypes[name]))
                   for name in names}
        with _one_line_errors(f"reading {self.directory}", ": is a file of it truncated or "
                              "corrupt? copy the checkpoint again"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`load_state_dict` is deprecated", FutureWarning)
            return mcore.dist_checkpointing.load(request, self.directory)


@contextlib.contextmanager
def open_checkpoint(directory, cfg: ModelConfig,
                    peft: PeftConfig | None = None) -> Iterator[CheckpointReader]:
    """A reader of ``directory``, checked to hold exactly the tensors of ``cfg``'s model
    (with ``peft``'s adapters; optimizer state aside): a checkpoint whose config disagrees
    with its tensors (say, a pruned pattern saved beside unpruned weights) is refused, naming
    the tensors."""
    with _meta_model(cfg, peft) as model:
        yield CheckpointReader(directory, cfg, model)


def _pieces(entry) -> list:
    """The saved tensors of one parameter: itself, or the pieces Megatron splits it into."""
    if isinstance(entry, _mapping.ShardedTensorFactory):
        return entry.build()
    return [entry]


def _with_data(entry, data: torch.Tensor):
    if isinstance(entry, _mapping.ShardedTensorFactory):
        return dataclasses.replace(entry, data=data)
    return dataclasses.replace(entry, data=data, dtype=data.dtype)


def _check_saved_tensors(saved: dict, expected: dict, directory, cfg: ModelConfig) -> None:
    model_keys = {key for key in saved if not key.startswith(OPTIMIZER_KEY_PREFIX)}
    missing = sorted(expected.keys() - model_keys)
    unexpected = sorted(model_keys - expected.keys())
    reshaped = [f"{key} saved {tuple(saved[key].global_shape)} vs "
                f"{tuple(expected[key].global_shape)}"
                for key in sorted(expected.keys() & model_keys)
                if tuple(saved[key].global_shape) != tuple(expected[key].global_shape)]
    if missing or unexpected or reshaped:
        raise ConversionError(
            f"{directory} does not hold the model its config describes (pattern "
            f"{cfg.pattern!r}, {cfg.num_layers} layers): missing {preview(missing)}; not in "
            f"that model {preview(unexpected)}; other shapes {preview(reshaped)}")


@contextlib.contextmanager
def _meta_model(cfg: ModelConfig, peft: PeftConfig | None) -> Iterator[torch.nn.Module]:
    with params.single_process_model_parallel():
        yield params.build_on_meta(cfg, peft)
