"""Hugging Face NemotronH model directories <-> this project's checkpoints, tensor by tensor.

- :func:`import_hf` (``convert hf-to-mcore``): config.json -> the model config, safetensors
  shards -> a Megatron dist_checkpointing checkpoint in ``checkpoint/dist_checkpoint.py``'s format (meta.json
  beside it), so ``checkpoint.load=OUT`` starts a run from it in any TP/PP layout; the
  tokenizer files are copied beside it (``tokenizer.path=OUT/tokenizer.json``).
- :func:`export_hf` (``convert mcore-to-hf``): a checkpoint (e.g. ``runs/NAME/checkpoints/
  step_N``) -> config.json, safetensors shards with NVIDIA's published names (``backbone.``)
  and their index, and the checkpoint's tokenizer files if it has any.

MoE routed experts are written as published (and as transformers 5.23's ``save_pretrained``
writes them): one tensor per expert, ``mixer.experts.{j}.up_proj.weight``. Import also reads
files that hold transformers' stacked 3-D ``mixer.experts.up_proj`` (e.g. a saved
``state_dict()``), one expert's rows at a time (``hf_mapping.stacked_expert``).

Memory stays near the largest tensor (import) or layer (export), never the model: import reads
each HF tensor when the checkpoint writer reaches it (one safetensors file opening per tensor,
so no shard stays mapped), export loads one layer at a time and streams it into shards whose
headers are planned up front. Tests measure it.

Exactness: every tensor keeps its dtype and bytes, so HF -> Megatron -> HF gives the same
tensors (one exception: Megatron keeps an MoE router's expert bias in float32, so a
lower-precision HF bias comes back upcast, equal in value; published files hold it in float32).
Before writing, the weights are checked against the config (names and shapes of HF's own model
built on the meta device; a checkpoint's tensors against its meta.json), and an export is read
back by the import checks; a config whose layer pattern disagrees with its layer count, or with
the weights, is refused. Output is written beside OUT and renamed at the end, so OUT appears
complete or not at all. One module because the two directions share those checks (an export
is verified by the import's reader) and the safetensors format code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatron_hybrid.checkpoint import dist_checkpoint, sharded_io
from megatron_hybrid.data.cache import sha256_bytes, temporary_sibling
from megatron_hybrid.model import hf_mapping
from megatron_hybrid.model.adapters import merged_weight
from megatron_hybrid.model.config import ModelConfig, PeftConfig
from megatron_hybrid.model.hf_mapping import ConversionError, preview
from megatron_hybrid.parallel.process_groups import ParallelDims

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
"""Files carried through both conversions unchanged (tokenizer, chat template, generation);
a converted checkpoint keeps them beside its tensors."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}
"""The safetensors dtypes weights may have, and their torch dtypes."""
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """A tensor of this dtype and shape on the meta device (no data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote."""

    out: Path
    parameters: int
    dtypes: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    adapters: str = ""
    """A LoRA checkpoint's adapters: "merged" into the weights or "left out" (the base)."""

    def __str__(self) -> str:
        carried = ", ".join(self.tokenizer_files) or "none (add the tokenizer files yourself)"
        return (f"wrote {self.out}: {self.parameters:,} parameters "
                f"({', '.join(self.dtypes)}); tokenizer files: {carried}")


def parse_size(text: str) -> int:
    """Bytes of ``5GB``, ``500MB``, ``64KB`` or a plain number (decimal units, as HF)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"size {text!r}: give a positive size such as 5GB, 500MB or 64KB")
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2)])


# ---------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------


def import_hf(hf_dir, out) -> Converted:
    """Convert the HF NemotronH directory ``hf_dir`` into a new checkpoint directory ``out``."""
    source = HFCheckpoint(hf_dir)
    with staged_directory(out) as staging:
        sharded_io.save_model(source.model_config, staging, dtypes=source.mcore_dtypes(),
                              produce=source.mcore_tensor)
        carried = copy_tokenizer_files(source.directory, staging)
        _write_meta(staging, source.model_config, _tokenizer_identity(staging))
    return Converted(Path(out), source.parameters(), source.dtype_names(), carried)


class HFCheckpoint:
    """An HF NemotronH model directory, checked before any tensor is read: config.json is a
    NemotronH config that converts exactly, every shard is present and whole, and the tensors
    are exactly those of HF's model for that config (names and shapes). ``specs`` name the
    tensors as ``hf_mapping.weight_map`` does (one per routed expert), whichever expert layout
    the files hold."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.hf_config = read_hf_config(self.directory)
        self.model_config = hf_mapping.model_config_from_hf(self.hf_config)
        self.files = _tensor_files(self.directory)
        self.specs = _per_expert(_read_specs(self.files))
        self.prefix = hf_mapping.detect_prefix(self.specs)
        _check_against_config(self.specs, hf_model_shapes(self.hf_config, self.prefix),
                              self.directory)
        self.maps = {entry.mcore: entry
                     for entry in hf_mapping.weight_map(self.model_config, self.prefix)}

    def read(self, name: str) -> torch.Tensor:
        """HF tensor ``name`` (a ``specs`` name): stored whole, or a row of a stacked one."""
        if name in self.files:
            with safe_open(self.files[name], framework="pt") as shard:
                return shard.get_tensor(name)
        stacked, row = hf_mapping.stacked_expert(name)
        with safe_open(self.files[stacked], framework="pt") as shard:
            return shard.get_slice(stacked)[row]

    def mcore_tensor(self, mcore_name: str) -> torch.Tensor:
        """A Megatron parameter (full, TP=1) made from its HF tensors."""
        entry = self.maps[mcore_name]
        return entry.fuse([self.read(name) for name in entry.hf])

    def mcore_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of each Megatron tensor: its HF tensors' (the expert bias: float32)."""
        dtypes = {}
        for entry in self.maps.values():
            found = {self.specs[name].dtype for name in entry.hf}
            if len(found) != 1:
                raise ConversionError(f"{self.directory}: {', '.join(entry.hf)} have different "
                                      f"dtypes {sorted(map(str, found))}; they are fused into "
                                      f"one Megatron tensor and must share one")
            dtypes[entry.mcore] = entry.fuse([self.specs[name].meta() for name in entry.hf]).dtype
        return dtypes

    def parameters(self) -> int:
        return sum(spec.numel for spec in self.specs.values())

    def dtype_names(self) -> tuple[str, ...]:
        return _dtype_names(self.specs.values())


def read_hf_config(directory: Path):
    """The ``NemotronHConfig`` of ``directory``, refusing other models and configs whose layer
    pattern and layer count disagree (transformers only warns and keeps the pattern)."""
    from transformers import NemotronHConfig

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{directory} has no {CONFIG_FILE}: give a Hugging Face model "
                              "directory (config.json and *.safetensors)")
    raw = _read_json(path)
    if raw.get("model_type") != "nemotron_h":
        architectures = ", ".join(raw.get("architectures") or ["no architectures"])
        raise ConversionError(f"{path} describes a {raw.get('model_type')!r} model "
                              f"({architectures}): only NemotronHForCausalLM (model_type "
                              "'nemotron_h') converts")
    hf_config = NemotronHConfig.from_pretrained(directory)
    _check_depth(raw, hf_config.hybrid_override_pattern, path)
    return hf_config


def _check_depth(raw: dict, pattern: str, path: Path) -> None:
    declared = raw.get("hybrid_override_pattern", pattern)
    layers = raw.get("num_hidden_layers", len(pattern))
    if declared != pattern:
        raise ConversionError(f"{path}: hybrid_override_pattern {declared!r} and "
                              f"layers_block_type ({pattern!r}) disagree: keep one of them")
    if layers != len(pattern):
        raise ConversionError(f"{path}: num_hidden_layers is {layers} but the layer pattern "
                              f"{pattern!r} has {len(pattern)} layers: make them agree (the "
                              "weights must follow the pattern)")


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> its safetensors file, from the index (or the one unsharded file)."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = {name: directory / file
                 for name, file in _read_json(index).get("weight_map", {}).items()}
        missing = sorted({path.name for path in files.values() if not path.is_file()})
        if missing:
            raise ConversionError(f"{directory}: shards {', '.join(missing)} named in "
                                  f"{INDEX_FILE} are missing: copy the complete checkpoint")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise ConversionError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: only "
                              "safetensors weights convert")
    with _open_shard(single) as shard:
        return {name: single for name in shard.keys()}


def _read_specs(files: dict[str, Path]) -> dict[str, TensorSpec]:
    """Name, dtype and shape of every tensor, from the shard headers (no tensor data read)."""
    specs = {}
    for path, names in groupby(sorted(files, key=lambda name: str(files[name])), files.get):
        with _open_shard(path) as shard:
            held = set(shard.keys())
            for name in names:
                if name not in held:
                    raise ConversionError(f"{path} lacks {name}, which {INDEX_FILE} places "
                                          "there: copy the checkpoint again")
                specs[name] = _spec(shard, name, path)
    return specs


def _per_expert(specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``specs`` with transformers' stacked expert tensors as the per-expert ones they hold."""
    split = hf_mapping.unfuse_experts({name: spec.meta() for name, spec in specs.items()})
    return {name: TensorSpec(name, tensor.dtype, tuple(tensor.shape))
            for name, tensor in split.items()}


def _open_shard(path: Path):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ConversionError(f"{path} is not a readable safetensors file ({err}): it is "
                              "truncated or corrupt, copy it again") from None


def _spec(shard, name: str, path: Path) -> TensorSpec:
    piece = shard.get_slice(name)
    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
    if dtype is None:
        raise ConversionError(f"{path}: {name} has dtype {piece.get_dtype()}; weights must be "
                              f"one of {', '.join(SAFETENSORS_DTYPES)}")
    return TensorSpec(name, dtype, tuple(piece.get_shape()))


def hf_model_shapes(hf_config, prefix: str) -> dict[str, tuple[int, ...]]:
    """Tensor names (decoder under ``prefix``, one tensor per routed expert) and shapes of HF's
    own ``NemotronHForCausalLM`` for ``hf_config``, built on the meta device."""
    from transformers import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(hf_config)
    tensors = hf_mapping.unfuse_experts(model.state_dict())
    return {re.sub(f"^{re.escape(hf_mapping.HF_PREFIX)}", prefix, name): tuple(tensor.shape)
            for name, tensor in tensors.items()}


def _check_against_config(specs: dict[str, TensorSpec], expected: dict[str, tuple],
                          directory: Path) -> None:
    missing = sorted(expected.keys() - specs.keys())
    unexpected = sorted(specs.keys() - expected.keys())
    reshaped = [f"{name} {specs[name].shape} vs {expected[name]}"
                for name in sorted(expected.keys() & specs.keys())
                if specs[name].shape != expected[name]]
    if missing or unexpected or reshaped:
        raise ConversionError(
            f"{directory}: the weights do not match {CONFIG_FILE}: missing {preview(missing)}; "
            f"not in the model {preview(unexpected)}; other shapes {preview(reshaped)}")


def _write_meta(directory: Path, cfg: ModelConfig, tokenizer: dict | None) -> None:
    """meta.json as a training run writes it (checkpoint/dist_checkpoint.py), at step 0 and
    the one-process layout."""
    meta = {"model": cfg.to_dict(), "tokenizer": tokenizer,
            "layout": ParallelDims().layout,
            "train_state": asdict(dist_checkpoint.TrainState()), "scheduler": None, "world_size": 1,
            "converted_from": "hf"}
    (directory / dist_checkpoint.META).write_text(json.dumps(meta, indent=2))


def _tokenizer_identity(directory: Path) -> dict | None:
    """The identity a run with ``tokenizer.kind=hf`` records (data/tokenizer.py), if any."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    import tokenizers

    data = path.read_bytes()
    backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    return {"kind": "hf", "vocab_size": backend.get_vocab_size(with_added_tokens=True),
            "sha256": sha256_bytes(data)}


# ---------------------------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------------------------


def export_hf(checkpoint_dir, out, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              merge: bool = False) -> Converted:
    """Convert checkpoint ``checkpoint_dir`` into a new HF NemotronH directory ``out``. Of a
    LoRA checkpoint the base weights are written, or with ``merge`` the weights with the
    adapters folded in (``W + alpha / r * B A``)."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = dist_checkpoint.read_meta(checkpoint_dir)
    cfg = ModelConfig(**meta["model"])
    cfg.validate()
    peft = PeftConfig(**meta["peft"]) if meta.get("peft") else None
    maps = hf_mapping.weight_map(cfg, hf_mapping.HF_CHECKPOINT_PREFIX)
    with sharded_io.open_checkpoint(checkpoint_dir, cfg, peft) as reader:
        specs = _hf_specs(maps, reader)
        hf_config = hf_mapping.hf_config_from_model(
            cfg, architectures=["NemotronHForCausalLM"], dtype=_main_dtype(specs))
        tensors = _hf_tensors(maps, reader, peft.scaling if peft and merge else None)
        with staged_directory(out) as staging:
            write_safetensors(staging, specs, tensors, max_shard_bytes)
            write_hf_config(staging, hf_config)
            carried = copy_tokenizer_files(checkpoint_dir, staging)
            _verify_export(staging, cfg)
    adapters = "" if peft is None else "merged" if merge else "left out"
    return Converted(Path(out), sum(spec.numel for spec in specs), _dtype_names(specs), carried,
                     adapters)


def _hf_specs(maps: list, reader) -> list[TensorSpec]:
    """Names, dtypes and shapes of the HF tensors, in writing order."""
    specs = []
    for entry in maps:
        saved = TensorSpec(entry.mcore, reader.dtypes[entry.mcore], reader.shapes[entry.mcore])
        specs += [TensorSpec(name, part.dtype, tuple(part.shape))
                  for name, part in zip(entry.hf, entry.split(saved.meta()))]
    return specs


def _hf_tensors(maps: list, reader, lora_scaling: float | None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in ``maps`` order, loading one layer of the checkpoint at a time;
    with ``lora_scaling`` each adapted weight has its adapter merged in."""
    for _, group in groupby(maps, key=lambda entry: entry.layer):
        group = list(group)
        names = [entry.mcore for entry in group]
        adapted = [name for name in names
                   if lora_scaling is not None and _adapter(name, "A") in reader.entries]
        loaded = reader.load(names + [_adapter(name, factor) for name in adapted
                                      for factor in "AB"])
        for name in adapted:
            loaded[name] = merged_weight(loaded[name], loaded.pop(_adapter(name, "A")),
                                         loaded.pop(_adapter(name, "B")), lora_scaling)
        for entry in group:
            yield from zip(entry.hf, entry.split(loaded.pop(entry.mcore)))


def _adapter(weight_name: str, factor: str) -> str:
    """The name of LoRA factor ``factor`` (A or B) of the linear holding ``weight_name``."""
    return f"{weight_name.removesuffix('.weight')}.lora_{factor}"


def _main_dtype(specs: list[TensorSpec]) -> torch.dtype:
    """The dtype holding most parameters (config.json's ``dtype``)."""
    counts = Counter()
    for spec in specs:
        counts[spec.dtype] += spec.numel
    return counts.most_common(1)[0][0]


def _dtype_names(specs: Iterable[TensorSpec]) -> tuple[str, ...]:
    return tuple(sorted({str(spec.dtype).removeprefix("torch.") for spec in specs}))


def write_hf_config(directory: Path, hf_config) -> None:
    """config.json with the layer pattern written out three ways, all derived from the one
    pattern: ``layers_block_type`` (transformers >= 5), ``hybrid_override_pattern`` and
    ``num_hidden_layers`` (earlier transformers, NVIDIA's remote code, serving stacks)."""
    data = json.loads(hf_config.to_json_string(use_diff=False))
    layers = hf_config.hybrid_override_pattern
    data.update(hybrid_override_pattern=layers, num_hidden_layers=len(layers))
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _verify_export(directory: Path, cfg: ModelConfig) -> None:
    """Read the export back as an import would, and check it describes ``cfg``'s model (in
    what an HF config carries)."""
    exported = HFCheckpoint(directory).model_config
    expected = cfg.replace(pattern=cfg.layer_pattern.layers, **{
        name: getattr(exported, name) for name in hf_mapping.NOT_IN_HF_CONFIG})
    if exported != expected:
        differences = {key: (value, getattr(expected, key))
                       for key, value in exported.to_dict().items()
                       if value != getattr(expected, key)}
        raise ConversionError(f"the exported {CONFIG_FILE} describes another model than the "
                              f"checkpoint (exported, checkpoint): {differences}")


def write_safetensors(directory: Path, specs: list[TensorSpec],
                      tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Write ``tensors`` (which must come in ``specs`` order) as HF safetensors shards of at
    most ``max_shard_bytes`` (a larger tensor gets a shard of its own) plus their index, one
    tensor in memory at a time: each shard's header is computed from ``specs`` first."""
    shards = _plan_shards(specs, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for file_name, shard in zip(names, shards):
        with open(directory / file_name, "wb") as stream:
            stream.write(_safetensors_header(shard))
            for spec in shard:
                stream.write(_raw_bytes(spec, *next(tensors)))
    if next(tensors, None) is not None:
        raise ConversionError("more tensors than planned reached the safetensors writer")
    if len(shards) > 1:
        weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards, size = [[]], 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _safetensors_header(shard: list[TensorSpec]) -> bytes:
    """8-byte little-endian length, then the JSON header padded with spaces to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in shard:
        header[spec.name] = {"dtype": _SAFETENSORS_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _raw_bytes(spec: TensorSpec, name: str, tensor: torch.Tensor):
    """The tensor's little-endian bytes, after checking it is the one ``spec`` planned."""
    if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
        raise ConversionError(f"the safetensors writer expected {spec.name} {spec.shape} "
                              f"{spec.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_directory(out) -> Iterator[Path]:
    """An empty directory beside ``out``, renamed to ``out`` when the block completes and
    removed when it fails: ``out`` appears complete or not at all."""
    out = Path(out)
    if out.exists():
        raise ConversionError(f"{out} already exists: remove it or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_tokenizer_files(source: Path, target: Path) -> tuple[str, ...]:
    """Copy the TOKENIZER_FILES present in ``source`` to ``target``; their names."""
    present = tuple(name for name in TOKENIZER_FILES if (source / name).is_file())
    for name in present:
        shutil.copyfile(source / name, target / name)
    return present


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None
