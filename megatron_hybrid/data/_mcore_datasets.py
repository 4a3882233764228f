"""The Megatron-Core (0.16.1) dataset names megatron_hybrid.data uses: the one place they are
imported.

These belong in ``megatron_hybrid/mcore.py``, the project's single importer of Megatron-Core
internals; until they move there they live here, imported lazily by the functions that need
them. Like ``mcore.py`` this module requires an installed backend.
"""

# ruff: noqa: E402, F401
from megatron_hybrid import backends

backends.require_active()

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
