"""The embedded default corpus: docstrings of the Python standard library, shipped as a file.

``stdlib_docstrings.jsonl.gz`` beside this module holds ~1.9 MB of real English text, so training
works offline and every machine trains on the same bytes whatever its Python version. It was
extracted once from CPython 3.11.7's standard library (its tests, idlelib and turtledemo left
out): one document per module with at least 200 characters of docstrings, being its module,
class and function docstrings in source order, each under a line naming its object. That text
is Python's documentation, under the Python Software Foundation License (PSF-2.0). About 4% of
the modules, chosen by a hash of the module name, are held out for validation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_hybrid.data.cache import atomic_write_bytes, resolve_cache_dir, sha256_bytes

SOURCE_PATH = Path(__file__).with_name("stdlib_docstrings.jsonl.gz")
"""One ``{"module": ..., "text": ...}`` line per document, in module order."""
VALID_ONE_IN = 25


@dataclass(frozen=True)
class CorpusInfo:
    train_path: Path
    """JSONL (``{"text": ...}`` per line) of the training documents."""
    valid_path: Path
    """JSONL of the held-out validation documents."""
    num_docs: int
    """Documents in both files."""
    num_valid_docs: int
    """Documents in the validation file."""
    num_bytes: int
    """Bytes of both files."""
    sha256: str
    """Hash of the training file then the validation file: the corpus's identity."""


def default_corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache entry for the shipped corpus file, keyed by its hash."""
    name = f"stdlib-docstrings-{sha256_bytes(SOURCE_PATH.read_bytes())[:16]}"
    return resolve_cache_dir(cache_dir) / "corpus" / name


def build_default_corpus(out_dir: str | os.PathLike | None = None) -> CorpusInfo:
    """Write ``train.jsonl`` and ``valid.jsonl`` into ``out_dir`` (default: the cache entry), or
    return the existing ones. ``meta.json`` is written last, so its presence means complete."""
    out_dir = Path(out_dir) if out_dir is not None else default_corpus_dir()
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        return _info_from_meta(out_dir, json.loads(meta_path.read_text()))
    train, valid = _split_documents(_read_source())
    train_bytes, valid_bytes = _jsonl_bytes(train), _jsonl_bytes(valid)
    atomic_write_bytes(out_dir / "train.jsonl", train_bytes)
    atomic_write_bytes(out_dir / "valid.jsonl", valid_bytes)
    meta = {"num_docs": len(train) + len(valid), "num_valid_docs": len(valid),
            "num_bytes": len(train_bytes) + len(valid_bytes),
            "sha256": sha256_bytes(train_bytes + valid_bytes)}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return _info_from_meta(out_dir, meta)


def read_texts(jsonl_path: Path) -> list[str]:
    with open(jsonl_path, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def _info_from_meta(out_dir: Path, meta: dict) -> CorpusInfo:
    fields = {name: meta[name] for name in ("num_docs", "num_valid_docs", "num_bytes", "sha256")}
    return CorpusInfo(train_path=out_dir / "train.jsonl", valid_path=out_dir / "valid.jsonl",
                      **fields)


def _read_source() -> list[tuple[str, str]]:
    """(module name, document) of every shipped document, in module order."""
    with gzip.open(SOURCE_PATH, "rt", encoding="utf-8") as lines:
        return [(record["module"], record["text"]) for record in map(json.loads, lines)]


def _split_documents(documents: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    train, valid = [], []
    for name, text in documents:
        held_out = int(hashlib.sha256(name.encode()).hexdigest(), 16) % VALID_ONE_IN == 0
        (valid if held_out else train).append(text)
    return train, valid


def _jsonl_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                   for text in texts).encode("utf-8")
