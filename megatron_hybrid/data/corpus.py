"""The embedded default corpus: the Python standard library's docstrings.

Every machine that runs this project has them, so training works offline on real English text
(~1.6 MB). One document per module: its module, class and function docstrings in source order,
each under a line naming its object. About 4% of the modules, chosen by a hash of the module
name (stable when other modules come or go between Python versions), are held out for
validation.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from megatron_hybrid.data.cache import atomic_write_bytes, resolve_cache_dir, sha256_bytes
from megatron_hybrid.data.workers import ordered_map

CORPUS_VERSION = 1
"""Bump when the extraction changes: it is part of the cache key."""

SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages",
                          "dist-packages", "__pycache__"})
VALID_ONE_IN = 25
MIN_DOCUMENT_CHARS = 200
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


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
    """The cache entry for this Python's standard library (its docstrings differ by version)."""
    version = ".".join(map(str, sys.version_info[:3]))
    name = f"stdlib-docstrings-v{CORPUS_VERSION}-py{version}"
    return resolve_cache_dir(cache_dir) / "corpus" / name


def build_default_corpus(out_dir: str | os.PathLike | None = None, *,
                         workers: int = 2) -> CorpusInfo:
    """Write ``train.jsonl`` and ``valid.jsonl`` into ``out_dir`` (default: the cache entry), or
    return the existing ones. ``meta.json`` is written last, so its presence means complete."""
    out_dir = Path(out_dir) if out_dir is not None else default_corpus_dir()
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        return _info_from_meta(out_dir, json.loads(meta_path.read_text()))
    train, valid = _split_documents(_extract_documents(workers))
    train_bytes, valid_bytes = _jsonl_bytes(train), _jsonl_bytes(valid)
    atomic_write_bytes(out_dir / "train.jsonl", train_bytes)
    atomic_write_bytes(out_dir / "valid.jsonl", valid_bytes)
    meta = {"num_docs": len(train) + len(valid), "num_valid_docs": len(valid),
            "num_bytes": len(train_bytes) + len(valid_bytes),
            "sha256": sha256_bytes(train_bytes + valid_bytes),
            "python": sys.version.split()[0], "corpus_version": CORPUS_VERSION}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return _info_from_meta(out_dir, meta)


def read_texts(jsonl_path: Path) -> list[str]:
    with open(jsonl_path, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def _info_from_meta(out_dir: Path, meta: dict) -> CorpusInfo:
    fields = {name: meta[name] for name in ("num_docs", "num_valid_docs", "num_bytes", "sha256")}
    return CorpusInfo(train_path=out_dir / "train.jsonl", valid_path=out_dir / "valid.jsonl",
                      **fields)


def _stdlib_modules() -> list[tuple[str, Path]]:
    """(dotted module name, source path) of the standard library, sorted, without tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if name not in SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(directory) / name
                parts = path.relative_to(root).with_suffix("").parts
                modules.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return modules


def _extract_documents(workers: int) -> list[tuple[str, str]]:
    """(module name, document) for every module with enough docstring text, in module order."""
    modules = _stdlib_modules()
    texts = ordered_map(_module_document, modules, workers=workers)
    return [(name, text) for (name, _), text in zip(modules, texts)
            if len(text) >= MIN_DOCUMENT_CHARS]


def _module_document(module: tuple[str, Path]) -> str:
    name, path = module
    try:
        with warnings.catch_warnings():  # invalid escape sequences in old modules' sources
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # sources for another Python (e.g. lib2to3 fixtures)
        return ""
    return "\n\n".join(_docstrings(tree, f"module {name}", prefix=""))


def _docstrings(node: ast.AST, title: str, prefix: str) -> list[str]:
    """``title\\ndocstring`` for ``node`` and the definitions nested in its body, in order."""
    docstring = ast.get_docstring(node)
    found = [f"{title}\n{docstring}"] if docstring else []
    for child in node.body:
        if isinstance(child, _DEFINITIONS):
            kind = "class" if isinstance(child, ast.ClassDef) else "def"
            qualname = prefix + child.name
            found += _docstrings(child, f"{kind} {qualname}", prefix=qualname + ".")
    return found


def _split_documents(documents: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    train, valid = [], []
    for name, text in documents:
        held_out = int(hashlib.sha256(name.encode()).hexdigest(), 16) % VALID_ONE_IN == 0
        (valid if held_out else train).append(text)
    return train, valid


def _jsonl_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                   for text in texts).encode("utf-8")

