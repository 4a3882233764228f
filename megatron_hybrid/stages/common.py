"""What the stages share: the model a stage's checkpoint holds, its held-out data, and the
summary each stage leaves for the pipeline report."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import ModelConfig

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig


SUMMARY = "summary.json"


def write_summary(run_dir: str | Path, *, heldout_loss: float | None = None,
                  task_metrics: dict[str, float] | None = None) -> Path:
    """A stage's summary for the pipeline report (call it on rank 0 at the end of the stage)."""
    path = Path(run_dir) / SUMMARY
    path.write_text(json.dumps({"heldout_loss": heldout_loss,
                                "task_metrics": task_metrics or {}}, indent=2) + "\n")
    return path



def require_heldout_data(cfg: RunConfig, stage: str) -> None:
    """Refuse a data blend without a validation share: the stage reports held-out loss."""
    from megatron_hybrid.data.datasets import parse_split

    if cfg.data.blend and parse_split(cfg.data.split)[1] == 0:
        raise ConfigError(f"{stage} measures held-out loss: give data.split a validation "
                          f"share (e.g. data.split='98,2,0'), got {cfg.data.split!r}")


def saved_model(directory: str, transformer_impl: str) -> ModelConfig:
    """The model saved in checkpoint ``directory``, built as ``transformer_impl``: the
    implementation is the loading run's choice (checkpoints load across the two)."""
    from megatron_hybrid.checkpoint.dist_checkpoint import read_meta

    return ModelConfig(**{**read_meta(directory)["model"], "transformer_impl": transformer_impl})


def with_modelopt_spec(cfg: RunConfig, stage: str) -> RunConfig:
    """``cfg`` building the local spec (``model.transformer_impl=local``): ModelOpt converts
    Megatron-Core's local layers, not its Transformer Engine spec (Megatron-Core ships
    ``get_mamba_stack_modelopt_spec`` for this reason). Says so on stderr, where it changes
    the recipe's choice on the cuda backend (the cpu backend builds local anyway)."""
    if cfg.model.transformer_impl == "local":
        return cfg
    from megatron_hybrid import backends

    on_gpu = "cuda" in (cfg.parallel.backend, backends.active())
    if on_gpu and int(os.environ.get("RANK", 0)) == 0:
        print(f"{stage}: model.transformer_impl=local (ModelOpt cannot convert the Transformer "
              f"Engine spec; checkpoints load across the two)", file=sys.stderr)
    return dataclasses.replace(cfg, model=cfg.model.replace(transformer_impl="local"))


def checkpoint_model(cfg: RunConfig, *, role: str) -> ModelConfig:
    """The model saved with ``checkpoint.load``; its pattern may differ from the recipe's (a
    depth prune chose the layers) but nothing else may."""
    from megatron_hybrid import backends

    if not cfg.checkpoint.load:
        raise ConfigError(f"set checkpoint.load to the {role} (a checkpoints/step_* folder)")
    # reading a checkpoint imports Megatron-Core
    backends.install(cfg.parallel.backend,
                     need_transformer_engine=cfg.model.needs_transformer_engine)
    saved = saved_model(cfg.checkpoint.load, cfg.model.transformer_impl)
    saved.validate()
    differing = [f"model.{name}: recipe {value!r}, checkpoint {getattr(saved, name)!r}"
                 for name, value in cfg.model.to_dict().items()
                 if name != "pattern" and value != getattr(saved, name)]
    if saved.num_layers != cfg.model.num_layers:
        differing.append(f"layers: recipe {cfg.model.num_layers}, checkpoint {saved.num_layers}")
    if differing:
        raise ConfigError(f"the recipe's model is not the one in {cfg.checkpoint.load} "
                          f"({'; '.join(differing)}): make the recipe's model section match")
    return saved



def task_dataset(cfg: RunConfig, split: str, num_samples: int):
    """``num_samples`` samples of the task's ``split`` conversations, unpacked (teacher and
    student see one conversation per sequence; no packed-sequence boundaries needed), with
    the assistant's tokens in the loss."""
    from megatron_hybrid.data.tokenizer import load_tokenizer
    from megatron_hybrid.stages import task

    return chat_dataset(cfg, task.conversations(split), load_tokenizer(cfg.tokenizer), False,
                        num_samples)


def describe_heldout(dataset, num_samples: int, *, task: bool) -> str:
    """What a held-out loss was measured on, for reports: the data and its loss tokens."""
    tokens = sum(int(dataset[sample]["loss_mask"].sum()) for sample in range(num_samples))
    data = "task conversations, assistant tokens" if task else "corpus text"
    return f"{data}, {tokens:,} tokens"


def chat_dataset(cfg: RunConfig, conversations: list, tokenizer, packed: bool,
                 num_samples: int):
    """``num_samples`` samples of ``conversations``, packed in a seeded shuffle (data.seed)."""
    from megatron_hybrid.data import chat

    sequences = chat.pack_conversations(conversations, tokenizer, seq_length=cfg.seq_length,
                                        packed=packed, seed=cfg.data.seed)
    return chat.ChatDataset(sequences, num_samples=num_samples, seed=cfg.data.seed)

