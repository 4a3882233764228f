"""Tokenise a JSONL file into a Megatron-Core indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input docs.jsonl --output-prefix out/docs \\
        --tokenizer-kind default-bpe --vocab-size 1024 --append-eod --workers 2

The output prefix is what ``data.blend`` names. The logic lives in
``megatron_hybrid.data.preprocess``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_hybrid.data.preprocess import check_input, preprocess_jsonl
from megatron_hybrid.data.tokenizer import KINDS, TokenizerConfig, load_tokenizer

USER_ERRORS = (ValueError, FileNotFoundError)
"""DataError and ConfigError are ValueErrors: printed as one line, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="the field holding each document")
    parser.add_argument("--tokenizer-kind", choices=KINDS, default="default-bpe")
    parser.add_argument("--tokenizer-path", help="hf: the tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size,
                        help="default-bpe: vocabulary size (trained on first use, then cached)")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the end-of-document token")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="tokenising processes")
    parser.add_argument("--cache-dir", help="default: $MEGATRON_HYBRID_CACHE or "
                        "~/.cache/megatron_hybrid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_input(Path(args.input))
        from megatron_hybrid import backends

        backends.install("auto")  # Megatron-Core (its dataset writer) loads only after this
        tokenizer = load_tokenizer(TokenizerConfig(kind=args.tokenizer_kind,
                                                   path=args.tokenizer_path,
                                                   vocab_size=args.vocab_size), args.cache_dir)
        stats = preprocess_jsonl(args.input, args.output_prefix, tokenizer,
                                 json_key=args.json_key, append_eod=args.append_eod,
                                 workers=args.workers)
    except USER_ERRORS as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 2
    print(f"{stats.output_prefix}.bin/.idx: {stats.num_docs:,} documents, "
          f"{stats.num_tokens:,} tokens in {stats.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
