"""Megatron-Core GPT datasets (real, blended, embedded-corpus or mock) and the micro-batch
iterator of one data-parallel rank.

Sample ids are global: step ``k`` of a run whose global batch is ``G`` samples reads samples
``[start + k*G, start + (k+1)*G)``, split contiguously across the data-parallel ranks, so the
global batch of a step does not depend on the DP size, and a run resumes exactly from the
number of samples it had consumed (its "data position", saved in checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy
import torch

from megatron_hybrid import backends
from megatron_hybrid.data import DataError, corpus
from megatron_hybrid.data.cache import resolve_cache_dir
from megatron_hybrid.data.preprocess import preprocess_jsonl
from megatron_hybrid.data.tokenizer import Tokenizer
from megatron_hybrid.errors import ConfigError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""What each micro-batch holds (labels are the tokens shifted left by one)."""
SPLITS = ("train", "valid", "test")
_IDX_HEADER = b"MMIDIDX\x00\x00"  # Megatron-Core indexed_dataset._INDEX_HEADER
_IDX_FIXED = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequences, documents
_FIX = "re-create it with tools/preprocess_data.py"


@dataclass(kw_only=True)
class DataConfig:
    blend: list | None = None
    """Indexed datasets by path prefix (``x`` for ``x.bin``/``x.idx``): ``[prefix, ...]``
    (weighted by size) or ``[[weight, prefix], ...]``."""
    split: str = "98,2,0"
    """Train, valid, test shares of each blended dataset's documents."""
    mock: bool = False
    """Synthetic tokens (Megatron-Core's MockGPTDataset) instead of files."""
    default_corpus: bool = False
    """The embedded standard-library corpus, tokenised into the cache on first use; it has its
    own held-out validation documents, so ``split`` does not apply."""
    seed: int = 1234
    """Seed of the document and sample shuffles."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: read samples in the training process)."""

    def validate(self) -> None:
        sources = [name for name, chosen in (("blend", bool(self.blend)), ("mock", self.mock),
                                             ("default_corpus", self.default_corpus)) if chosen]
        if len(sources) != 1:
            raise ConfigError(f"data: choose exactly one source of data.blend=[...], "
                              f"data.mock=true, data.default_corpus=true (got: "
                              f"{', '.join(sources) or 'none'})")
        if self.blend:
            parse_blend(self.blend)
            parse_split(self.split)
        if self.default_corpus and self.split != DataConfig.split:
            raise ConfigError(f"data.split={self.split!r} does not apply to "
                              f"data.default_corpus=true, which has its own held-out documents: "
                              f"remove data.split")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")


def parse_blend(blend: list) -> tuple[list[str], list[float] | None]:
    """``data.blend`` -> Megatron-Core's ``(prefixes, weights or None)``."""
    if all(isinstance(entry, (str, os.PathLike)) for entry in blend):
        return [str(prefix) for prefix in blend], None
    if all(isinstance(entry, (list, tuple)) and len(entry) == 2 for entry in blend):
        weights = [entry[0] for entry in blend]
        if all(isinstance(w, (int, float)) and w > 0 for w in weights):
            return [str(entry[1]) for entry in blend], [float(w) for w in weights]
    raise ConfigError(f"data.blend={blend!r}: give prefixes [a, b] or positive weights with "
                      "prefixes [[0.3, a], [0.7, b]], not a mix")


def parse_split(split: str) -> list[float]:
    """``"98,2,0"`` -> train, valid, test shares."""
    try:
        shares = [float(share) for share in split.split(",")]
    except ValueError:
        shares = []
    shares += [0.0] * (len(SPLITS) - len(shares))
    if len(shares) != len(SPLITS) or min(shares) < 0 or sum(shares) <= 0:
        raise ConfigError(f"data.split={split!r}: give train,valid,test shares like '98,2,0'")
    return shares


def build_datasets(data_cfg: DataConfig, tokenizer: Tokenizer, *, seq_length: int,
                   train_samples: int, valid_samples: int,
                   cache_dir: str | os.PathLike | None = None) -> tuple:
    """(train, valid) datasets of ``seq_length``-token samples; valid is None when not split.

    Every rank calls this (with torch.distributed initialised, rank 0 builds the index caches
    first and the others read them: ``cache_dir`` must be shared between nodes).
    """
    from megatron_hybrid import mcore as mds

    data_cfg.validate()
    cache_dir = resolve_cache_dir(cache_dir)
    sizes = [train_samples, valid_samples, 0]
    sources = _sources(data_cfg, tokenizer, cache_dir)
    config = mds.GPTDatasetConfig(
        random_seed=data_cfg.seed, sequence_length=seq_length, tokenizer=tokenizer,
        path_to_cache=str(cache_dir / "index-cache"), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, **sources)
    dataset_class = mds.MockGPTDataset if data_cfg.mock else mds.GPTDataset
    builder = mds.BlendedMegatronDatasetBuilder(dataset_class, sizes, _every_rank, config)
    with _process_group_for_builder():
        train, valid, _ = builder.build()
    return train, valid


def _sources(data_cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> dict:
    """GPTDatasetConfig's blend arguments, after checking every file they name."""
    if data_cfg.mock:
        return {}  # no blend: Megatron-Core switches to mock data
    if data_cfg.default_corpus:
        train_prefix, valid_prefix = prepare_default_corpus(tokenizer, cache_dir)
        for prefix in (train_prefix, valid_prefix):
            check_indexed_dataset(prefix)
        return {"blend_per_split": [([train_prefix], None), ([valid_prefix], None), None]}
    prefixes, weights = parse_blend(data_cfg.blend)
    for prefix in prefixes:
        _check_split_shares(prefix, check_indexed_dataset(prefix), data_cfg.split)
    return {"blend": (prefixes, weights), "split": data_cfg.split}


def prepare_default_corpus(tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None
                           ) -> tuple[str, str]:
    """Prefixes of the embedded corpus tokenised by ``tokenizer`` (built on first use)."""
    cache_dir = resolve_cache_dir(cache_dir)
    info = corpus.build_default_corpus(corpus.default_corpus_dir(cache_dir))
    out_dir = (cache_dir / "default-corpus-tokens"
               / f"{info.sha256[:16]}-{tokenizer.identity['sha256'][:16]}")
    prefixes = []
    for split, jsonl_path in (("train", info.train_path), ("valid", info.valid_path)):
        prefix = str(out_dir / split)
        if not Path(prefix + ".idx").exists():  # the .idx is renamed into place last
            preprocess_jsonl(jsonl_path, prefix, tokenizer, append_eod=True, progress=False)
        prefixes.append(prefix)
    return prefixes[0], prefixes[1]


def check_indexed_dataset(prefix: str) -> numpy.ndarray:
    """The sequence lengths of ``prefix``, after checking its ``.idx``/``.bin`` pair is whole.

    Runs before Megatron-Core opens the files, whose asserts name neither the file nor the fix.
    """
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"{path}: missing; create it with tools/preprocess_data.py "
                            f"--output-prefix {prefix}")
    with open(idx_path, "rb") as stream:
        fixed = stream.read(_IDX_FIXED.size)
    if len(fixed) < _IDX_FIXED.size or fixed[:len(_IDX_HEADER)] != _IDX_HEADER:
        raise DataError(f"{idx_path}: not a Megatron-Core index file; {_FIX}")
    _, _, dtype_code, num_sequences, num_documents = _IDX_FIXED.unpack(fixed)
    expected = _IDX_FIXED.size + num_sequences * (4 + 8) + num_documents * 8
    if idx_path.stat().st_size < expected:
        raise DataError(f"{idx_path}: truncated ({idx_path.stat().st_size} bytes, its header "
                        f"promises {expected}); {_FIX}")
    lengths = numpy.fromfile(idx_path, dtype=numpy.int32, count=num_sequences,
                             offset=_IDX_FIXED.size)
    num_tokens = int(lengths.sum(dtype=numpy.int64))
    if num_tokens == 0:
        raise DataError(f"{prefix}: empty dataset (no tokens); {_FIX} from a non-empty input")
    bin_bytes = num_tokens * _token_size(dtype_code, idx_path)
    if bin_path.stat().st_size != bin_bytes:
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, but {idx_path.name} "
                        f"describes {bin_bytes} (truncated, or from another run); {_FIX}")
    return lengths


def _token_size(dtype_code: int, idx_path: Path) -> int:
    from megatron_hybrid.mcore import DType

    try:
        return DType.size(dtype_code)
    except ValueError:
        raise DataError(f"{idx_path}: unknown token dtype code {dtype_code}; {_FIX}") from None


def _check_split_shares(prefix: str, lengths: numpy.ndarray, split: str) -> None:
    """Each split with a share must get tokens: Megatron-Core loops forever on an empty one
    (``GPTDataset._get_num_epochs``), even when no sample of that split is requested."""
    shares = parse_split(split)
    bounds = numpy.cumsum([0.0] + shares) / sum(shares)
    for name, low, high in zip(SPLITS, bounds[:-1], bounds[1:]):
        begin, end = (int(round(bound * len(lengths))) for bound in (low, high))
        if high > low and lengths[begin:end].sum() == 0:
            raise DataError(f"{prefix}: data.split={split!r} leaves the {name} split of its "
                            f"{len(lengths)} documents empty; use more documents or a larger "
                            f"{name} share")


def _every_rank() -> bool:
    """Every rank builds (or loads) its datasets and reads only its own samples."""
    return True


@contextlib.contextmanager
def _process_group_for_builder():
    """Megatron-Core's BlendedDataset calls ``torch.distributed.get_rank()`` unguarded when it
    caches its indices (``datasets/blended_dataset.py``, 0.16.1); a process without
    torch.distributed gets a private one-rank gloo group while the datasets are built."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class RankMicrobatches(torch.utils.data.Sampler):
    """The sample ids of one DP rank's micro-batches, step after step, from ``start_sample``.

    Stops before a step the dataset cannot fill completely.
    """

    def __init__(self, *, num_samples: int, start_sample: int, micro_batch_size: int,
                 num_microbatches: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if start_sample < 0 or micro_batch_size < 1 or num_microbatches < 1:
            raise ValueError(f"need start_sample >= 0 (got {start_sample}), micro_batch_size "
                             f">= 1 (got {micro_batch_size}), num_microbatches >= 1 "
                             f"(got {num_microbatches})")
        self.micro_batch_size = micro_batch_size
        self.num_microbatches = num_microbatches
        self.rank_samples = micro_batch_size * num_microbatches
        self.global_batch = self.rank_samples * dp_size
        self.num_steps = max(0, (num_samples - start_sample) // self.global_batch)
        self.first_sample = start_sample + dp_rank * self.rank_samples

    def __len__(self) -> int:
        return self.num_steps * self.num_microbatches

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.num_steps):
            step_first = self.first_sample + step * self.global_batch
            for micro in range(self.num_microbatches):
                first = step_first + micro * self.micro_batch_size
                yield list(range(first, first + self.micro_batch_size))


def microbatch_iterator(dataset, *, start_sample: int, micro_batch_size: int,
                        num_microbatches: int, dp_rank: int, dp_size: int,
                        num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches (dicts of ``[micro_batch_size, seq_length]`` tensors keyed by
    BATCH_KEYS, plus the dataset's ``extra_keys`` if it has them), ``num_microbatches`` per step,
    starting at global sample ``start_sample``."""
    sampler = RankMicrobatches(num_samples=len(dataset), start_sample=start_sample,
                               micro_batch_size=micro_batch_size,
                               num_microbatches=num_microbatches, dp_rank=dp_rank,
                               dp_size=dp_size)
    keys = (*BATCH_KEYS, *getattr(dataset, "extra_keys", ()))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=partial(_collate, keys),
                                         pin_memory=backends.pins_memory())
    return iter(loader)


def _collate(keys: tuple[str, ...], samples: list[dict]) -> dict[str, torch.Tensor]:
    """``keys`` of the samples stacked: BATCH_KEYS, and what a stage's dataset declares in
    ``extra_keys`` (DPO's per-sequence ``ref_logp``); Megatron's samples carry more."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in keys}
