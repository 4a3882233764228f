"""A trained model, ready to generate: a checkpoint directory (``step_*`` of a run, or one
converted from Hugging Face) or a Hugging Face NemotronH directory, with its tokenizer.

The tokenizer is the run's (the ``tokenizer`` section of the ``config.yaml`` saved beside the
weights) or, for a converted or Hugging Face model, the ``tokenizer.json`` it carries. A Hugging
Face directory is converted once into a temporary checkpoint (``checkpoint.hf_checkpoint``).
Under ``torchrun`` the model is split over the ranks with ``tp`` and ``pp`` (their product is
the world size); context and sequence parallelism are training layouts and are refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_hybrid import backends, sections
from megatron_hybrid.errors import ConfigError

DEFAULT_MAX_REQUESTS = 8


def is_hf_directory(directory: Path) -> bool:
    return (directory / "config.json").is_file() and not (directory / "metadata.json").exists()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def check_layout(tp: int, pp: int) -> None:
    """Refuse a decode layout the launched processes cannot form, in one line."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp {tp} --pp {pp}: sizes start at 1")
    if tp * pp != world_size():
        raise ConfigError(f"--tp {tp} x --pp {pp} needs {tp * pp} processes, got "
                          f"{world_size()}: launch with torchrun --nproc-per-node {tp * pp}")


def tokenizer_for(directory: Path):
    """The checkpoint's tokenizer: its run's config.yaml section, else its tokenizer.json."""
    from megatron_hybrid.checkpoint.dist_checkpoint import CheckpointError
    from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer

    if (directory / "config.yaml").is_file():
        cfg = sections.read_section(directory / "config.yaml", "tokenizer", TokenizerConfig)
    elif (directory / "tokenizer.json").is_file():
        cfg = TokenizerConfig(kind="hf", path=str(directory / "tokenizer.json"))
    else:
        raise CheckpointError(f"{directory} has neither a config.yaml nor a tokenizer.json: "
                              f"copy the tokenizer.json the model was trained with into it")
    return load_tokenizer(cfg)


@contextlib.contextmanager
def loaded_model(path: str | os.PathLike, *, backend: str = "auto", tp: int = 1, pp: int = 1,
                 seed: int = 0) -> Iterator[tuple]:
    """``(model, tokenizer, model_config)`` of the checkpoint or Hugging Face directory
    ``path``, this rank's part of a ``tp`` x ``pp`` split, in a process group that ends with
    the block."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{directory} does not exist: give a checkpoint (step_*) or a "
                          f"Hugging Face model directory")
    check_layout(tp, pp)
    backend = backends.install(backend)  # before Megatron-Core is imported
    with contextlib.ExitStack() as stack:
        if is_hf_directory(directory):
            directory = _converted(directory, stack)
        yield _build_and_load(directory, backend=backend, tp=tp, pp=pp, seed=seed, stack=stack)


def _converted(hf_dir: Path, stack: contextlib.ExitStack) -> Path:
    """``hf_dir`` as a checkpoint in a temporary directory removed with ``stack``; every rank
    converts its own copy (a local read, cheaper than coordinating a shared one)."""
    from megatron_hybrid.checkpoint.hf_checkpoint import import_hf

    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="megatron-hybrid-")))
    return import_hf(hf_dir, scratch / "checkpoint").out


def _build_and_load(directory: Path, *, backend: str, tp: int, pp: int, seed: int,
                    stack: contextlib.ExitStack) -> tuple:
    from megatron_hybrid.checkpoint.dist_checkpoint import CheckpointError, load_weights, read_meta
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.model.config import ModelConfig, PeftConfig
    from megatron_hybrid.parallel import process_groups

    meta = read_meta(directory)
    tokenizer = tokenizer_for(directory)
    if meta.get("tokenizer") and tokenizer.identity != meta["tokenizer"]:
        raise CheckpointError(f"{directory}: its tokenizer {tokenizer.identity} is not the one "
                              f"it was trained with ({meta['tokenizer']}): restore the "
                              f"tokenizer it was saved with")
    model_config = ModelConfig(**meta["model"])
    process_groups.init_distributed(process_groups.ParallelDims(tp=tp, pp=pp,
                                                                world_size=world_size()),
                                    backend=backend)
    stack.callback(process_groups.destroy_distributed)
    process_groups.seed_everything(seed)  # Megatron-Core's layers fork its RNG tracker on build
    # A LoRA checkpoint (its meta names the adapters) generates with its adapters on.
    peft = PeftConfig(**meta["peft"]) if meta.get("peft") else None
    model = build_model(model_config, ModelLayout(tp=tp, pp=pp), backend=backend, peft=peft)
    load_weights([model], directory)
    return model, tokenizer, model_config
