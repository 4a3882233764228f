"""megatron-hybrid: hybrid Mamba-Transformer (Nemotron-H) training on Megatron-Core.

Importing this package patches nothing and imports neither torch nor Megatron-Core;
a backend is installed explicitly with :func:`megatron_hybrid.backends.install`.
"""

__version__ = "0.1.0"
