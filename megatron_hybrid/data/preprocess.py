"""JSONL -> Megatron-Core indexed dataset (``prefix.bin`` + ``prefix.idx``), one sequence per
document.

Chunks of lines are parsed and tokenised in worker processes (``imap`` keeps their order), and
written by this process through Megatron-Core's ``IndexedDatasetBuilder`` under a temporary
prefix, renamed into place only when complete: an interrupted or failed run leaves nothing
under the final name. This module imports neither torch nor Megatron-Core at import time, so
spawned workers start quickly.
"""

from __future__ import annotations

import json
from contextlib import closing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy
from tqdm import tqdm

from megatron_hybrid.data import DataError
from megatron_hybrid.data.cache import temporary_sibling
from megatron_hybrid.data.tokenizer import Tokenizer
from megatron_hybrid.data.workers import ordered_map

Chunk = tuple[list[tuple[int, bytes]], int]
"""(line number, raw line) of each non-blank line, and the chunk's size in bytes."""


@dataclass(frozen=True)
class PreprocessStats:
    output_prefix: str
    num_docs: int
    num_tokens: int
    seconds: float


@dataclass(frozen=True)
class _EncodeSpec:
    """What each worker needs to turn raw lines into token arrays."""
    tokenizer: Tokenizer
    input_name: str
    json_key: str
    append_eod: bool
    dtype: type


_spec: _EncodeSpec | None = None  # set once per worker process by _init_worker


def preprocess_jsonl(input_path: str | os.PathLike, output_prefix: str | os.PathLike,
                     tokenizer: Tokenizer, *, json_key: str = "text", append_eod: bool = False,
                     workers: int = 1, chunk_docs: int = 256,
                     progress: bool = True) -> PreprocessStats:
    """Tokenise the ``json_key`` field of every line of ``input_path`` into ``output_prefix``."""
    input_path, output_prefix = Path(input_path), str(output_prefix)
    check_input(input_path)
    from megatron_hybrid.mcore import DType

    spec = _EncodeSpec(tokenizer=tokenizer, input_name=str(input_path), json_key=json_key,
                       append_eod=append_eod, dtype=DType.optimal_dtype(tokenizer.vocab_size))
    start = time.perf_counter()
    encoded = ordered_map(_encode_chunk, _read_chunks(input_path, chunk_docs), workers=workers,
                          initializer=_init_worker, initargs=(spec, workers > 1))
    with closing(encoded), tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True,
                                disable=not progress, desc=f"tokenising {input_path.name}") as bar:
        num_docs, num_tokens = _write_indexed_dataset(output_prefix, spec.dtype, encoded, bar,
                                                      input_path)
    return PreprocessStats(output_prefix=output_prefix, num_docs=num_docs,
                           num_tokens=num_tokens, seconds=time.perf_counter() - start)


def check_input(input_path: Path) -> None:
    """Fail early (before any tokenizer is trained or loaded) on a missing or empty input."""
    if not input_path.is_file():
        raise DataError(f"{input_path}: input file not found; pass a JSONL file with --input")
    if input_path.stat().st_size == 0:
        raise DataError(f"{input_path}: input file is empty; it needs one JSON object per line")


def _read_chunks(input_path: Path, chunk_docs: int) -> Iterator[Chunk]:
    lines, nbytes = [], 0
    with open(input_path, "rb") as stream:
        for line_no, line in enumerate(stream, start=1):
            nbytes += len(line)
            if line.strip():
                lines.append((line_no, line))
            if len(lines) == chunk_docs:
                yield lines, nbytes
                lines, nbytes = [], 0
    if lines or nbytes:
        yield lines, nbytes


def _init_worker(spec: _EncodeSpec, in_pool: bool) -> None:
    global _spec
    _spec = spec
    if in_pool:  # the processes are the parallelism: no tokenizer threads competing with them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_chunk(chunk: Chunk) -> tuple[list[numpy.ndarray], int]:
    lines, nbytes = chunk
    texts = [_document_text(line_no, line) for line_no, line in lines]
    eod = [_spec.tokenizer.eod] if _spec.append_eod else []
    arrays = [numpy.asarray(ids + eod, dtype=_spec.dtype)
              for ids in _spec.tokenizer.encode_batch(texts)]
    return arrays, nbytes


def _document_text(line_no: int, line: bytes) -> str:
    where = f"{_spec.input_name}:{line_no}"
    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{where}: bad JSON ({err}); each line must be one JSON object") from None
    if not isinstance(record, dict) or _spec.json_key not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no key {_spec.json_key!r} (found: {keys}); "
                        "choose the text field with --json-key")
    text = record[_spec.json_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {_spec.json_key!r} must be a string, not "
                        f"{type(text).__name__}")
    return text


def _write_indexed_dataset(output_prefix: str, dtype: type,
                           encoded: Iterator[tuple[list[numpy.ndarray], int]], bar: tqdm,
                           input_path: Path) -> tuple[int, int]:
    from megatron_hybrid.mcore import IndexedDatasetBuilder

    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = str(temporary_sibling(Path(output_prefix)))
    tmp_paths = [Path(tmp_prefix + ".bin"), Path(tmp_prefix + ".idx")]
    num_docs = num_tokens = 0
    try:
        builder = IndexedDatasetBuilder(str(tmp_paths[0]), dtype=dtype)
        for arrays, nbytes in encoded:
            for array in arrays:
                builder.add_document(array, [array.size])
            num_docs += len(arrays)
            num_tokens += sum(array.size for array in arrays)
            bar.update(nbytes)
        builder.finalize(str(tmp_paths[1]))
        if num_docs == 0:
            raise DataError(f"{input_path}: no documents (only blank lines)")
        for tmp_path, suffix in zip(tmp_paths, (".bin", ".idx")):
            os.replace(tmp_path, output_prefix + suffix)
    finally:
        for tmp_path in tmp_paths:
            tmp_path.unlink(missing_ok=True)
    return num_docs, num_tokens
