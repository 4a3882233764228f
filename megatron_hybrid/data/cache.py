"""Where derived data (corpus, tokenizers, tokenized datasets, index caches) is kept, and how
files get there: written under a temporary name and renamed, so an interrupted run never leaves
a half-written file behind a final name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "MEGATRON_HYBRID_CACHE"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$MEGATRON_HYBRID_CACHE``, else
    ``~/.cache/megatron_hybrid``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron_hybrid"
    return Path(cache_dir)


def temporary_sibling(path: Path) -> Path:
    """A name beside ``path`` that no other process uses (same filesystem: renames are atomic)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
