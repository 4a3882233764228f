"""Data for the training loop, in the order it flows:

- ``corpus``     the embedded default corpus (the standard library's docstrings, no download)
- ``tokenizer``  a locally trained byte-level BPE or a Hugging Face ``tokenizer.json``
- ``preprocess`` JSONL -> Megatron-Core indexed dataset (``.bin``/``.idx``)
- ``datasets``   Megatron-Core GPT datasets and blends, and the per-rank micro-batch iterator

Importing this package imports neither torch nor Megatron-Core (preprocessing workers import
only ``preprocess``); Megatron-Core is reached through ``megatron_hybrid.mcore`` after a backend is
installed.
"""


class DataError(ValueError):
    """A data file or data input is missing or unusable; the message names the file and the fix."""
