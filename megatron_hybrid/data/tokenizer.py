"""Tokenizers: a byte-level BPE trained here on the embedded corpus (seconds, cached), or a
Hugging Face ``tokenizer.json`` (Nemotron's 131072-token vocabulary).

:class:`Tokenizer` also serves as the ``tokenizer`` of Megatron-Core's ``GPTDatasetConfig``,
which reads only ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` from it
(``datasets/gpt_dataset.py``, ``datasets/megatron_dataset.py``, 0.16.1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from megatron_hybrid.data import DataError, corpus
from megatron_hybrid.data.cache import atomic_write_bytes, resolve_cache_dir, sha256_bytes
from megatron_hybrid.errors import ConfigError

KINDS = ("default-bpe", "hf")
CHAT_TOKENS = ("<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<think>", "</think>")
"""The markers of Nemotron Nano 2's chat template (``data/chat.py``): system turn, user and
assistant turn, end of turn, and the think block; single tokens in Nemotron's vocabulary too."""
SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", *CHAT_TOKENS)
"""Special tokens of default-bpe, ids 0..6."""
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "<PAD>")
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


@dataclass(kw_only=True)
class TokenizerConfig:
    kind: str = "default-bpe"
    """``default-bpe`` (trained locally on the embedded corpus) or ``hf`` (a tokenizer.json)."""
    path: str | None = None
    """hf: path to a Hugging Face ``tokenizer.json`` (e.g. Nemotron-H's, 131072 tokens)."""
    vocab_size: int = 1024
    """default-bpe: vocabulary size to train (specials included); must fit the model's."""
    eod_token: str | None = None
    """End-of-document token; None: the first present of <|endoftext|>, </s>, <eos>."""
    pad_token: str | None = None
    """Padding token; None: the first present of <pad>, <|pad|>, <PAD>."""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"tokenizer.kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind == "hf" and not self.path:
            raise ConfigError("tokenizer.kind=hf needs tokenizer.path (a tokenizer.json)")
        if self.kind == "default-bpe" and self.vocab_size < MIN_BPE_VOCAB:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size} is too small for a "
                              f"byte-level BPE: use at least {MIN_BPE_VOCAB}")


class Tokenizer:
    """Text <-> ids, plus the special ids and identity a training run and Megatron-Core need."""

    def __init__(self, backend: tokenizers.Tokenizer, *, kind: str, json_path: Path,
                 json_sha256: str, eod_token: str, pad_token: str):
        self.backend = backend
        self.kind = kind
        self.json_path = json_path
        """The tokenizer.json this tokenizer was loaded from."""
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eod = backend.token_to_id(eod_token)
        self.pad = backend.token_to_id(pad_token)
        self.identity = {"kind": kind, "vocab_size": self.vocab_size, "sha256": json_sha256}
        """Saved with checkpoints: a checkpoint must be resumed with the same tokenizer."""

    @property
    def unique_identifiers(self) -> dict:
        """Megatron-Core hashes this into its dataset-index cache keys."""
        return self.identity

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in
                self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def load_tokenizer(cfg: TokenizerConfig, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The configured tokenizer; default-bpe is trained on first use and cached."""
    cfg.validate()
    if cfg.kind == "hf":
        json_path = Path(cfg.path)
        if not json_path.is_file():
            raise DataError(f"{json_path}: tokenizer.json not found; set tokenizer.path to a "
                            "Hugging Face tokenizer.json")
    else:
        json_path = default_bpe(cfg.vocab_size, cache_dir)
    return _from_json(json_path, cfg)


def default_bpe(vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached default-bpe ``tokenizer.json``, keyed by (corpus hash, special tokens, vocab
    size)."""
    info = corpus.build_default_corpus(corpus.default_corpus_dir(cache_dir))
    specials = sha256_bytes("\n".join(SPECIAL_TOKENS).encode("utf-8"))
    name = f"default-bpe-{vocab_size}-{info.sha256[:16]}-{specials[:8]}"
    json_path = resolve_cache_dir(cache_dir) / "tokenizers" / name / "tokenizer.json"
    if not json_path.exists():
        train_bpe(info.train_path, vocab_size, json_path)
    return json_path


def train_bpe(jsonl_path: Path, vocab_size: int, out_path: Path) -> None:
    """Train a byte-level BPE on the ``text`` of a JSONL file; same input, same file bytes."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(corpus.read_texts(jsonl_path), trainer)
    atomic_write_bytes(out_path, backend.to_str().encode("utf-8"))


def _from_json(json_path: Path, cfg: TokenizerConfig) -> Tokenizer:
    data = json_path.read_bytes()
    try:
        backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # the library raises a bare Exception for malformed files
        raise DataError(f"{json_path}: not a readable tokenizer.json ({err})") from None
    return Tokenizer(backend, kind=cfg.kind, json_path=json_path, json_sha256=sha256_bytes(data),
                     eod_token=_special_token(backend, cfg.eod_token, EOD_CANDIDATES, "eod_token",
                                              json_path),
                     pad_token=_special_token(backend, cfg.pad_token, PAD_CANDIDATES, "pad_token",
                                              json_path))


def _special_token(backend: tokenizers.Tokenizer, requested: str | None, candidates: tuple,
                   field: str, json_path: Path) -> str:
    options = (requested,) if requested else candidates
    for token in options:
        if backend.token_to_id(token) is not None:
            return token
    raise DataError(f"{json_path}: has none of {', '.join(options)}; set tokenizer.{field} to "
                    "one of its special tokens")
