"""Post-training quantization (PTQ) of the Megatron-Core model through ModelOpt, the
quantization-aware training hook of the SFT and distill stages, and quantized checkpoints.

ModelOpt's Megatron plugin replaces the parallel linears (the Mamba ``in_proj``/``out_proj``,
the MLP and MoE linears, attention) with quantized ones; :func:`quantize` calibrates their
ranges on data, with the bf16 layers of ``formats``. A quantized model computes with its
weights and inputs rounded to the format and back (fake quantization) on either backend, so
its loss and accuracy can be measured here; training it trains through the rounding (QAT).

A quantized checkpoint is a weights checkpoint whose shards also hold each quantizer's state
(ModelOpt keeps it as the modules' extra state) and a ``modelopt_state/`` folder (the modes to
re-apply); :func:`load_quantized` rebuilds the quantized model from it. Read by a plain
loader (``load_weights``), the same folder gives the unquantized weights.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.quantization import formats

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

QUANTIZATION_META = "quantization"
"""The key of the format in a quantized checkpoint's meta.json."""


def quantize(model, name: str, layers: str, *, backend: str, forward_loop: Callable):
    """``model`` fake-quantized in format ``name`` (in place), its ranges calibrated by
    ``forward_loop(model)``; ``layers`` is the model's whole pattern (its bf16 layers)."""
    import modelopt.torch.quantization as mtq

    config = formats.quant_config(name, model, layers, backend=backend)
    with warnings.catch_warnings():  # the conv1d and MLP wrappers hold no quantized linear
        warnings.filterwarnings("ignore", message="Distributed training is initialized but no "
                                                  "parallel_state is set")
        # SmoothQuant names each linear kept in bf16 (attention, the output layer)
        warnings.filterwarnings("ignore", message=".* is not calibrated, skip smoothing")
        model = mtq.quantize(model, config, forward_loop)
    return _with_cached_attention(model)


def _with_cached_attention(model):
    """``model`` with Megatron-Core's dynamic-engine attention back: ModelOpt's hook replaces
    every attention's ``flash_decode_and_prefill`` (and ``flash_decode``) by one that raises,
    for KV-cache quantization, which no format here enables (attention stays bf16), so
    generation works as before."""
    from megatron_hybrid import mcore

    for module in model.modules():
        if isinstance(module, mcore.Attention):
            for method in ("flash_decode", "flash_decode_and_prefill"):
                module.__dict__.pop(method, None)  # the class's own method shows again
    return model


def mean_loss(model, dataset, *, samples: int, micro_batch_size: int, seq_length: int,
              forward_step: Callable | None = None) -> float:
    """Mean per-token loss of ``model`` (bare, not DDP-wrapped) over the first ``samples``
    of ``dataset``, each data-parallel rank its share; also a calibration forward loop."""
    from megatron_hybrid import mcore
    from megatron_hybrid.data.datasets import microbatch_iterator
    from megatron_hybrid.engine import training_step

    state = mcore.parallel_state
    dp = state.get_data_parallel_world_size()
    num_microbatches = max(min(samples, len(dataset)) // (micro_batch_size * dp), 1)
    batches = microbatch_iterator(dataset, start_sample=0, micro_batch_size=micro_batch_size,
                                  num_microbatches=num_microbatches,
                                  dp_rank=state.get_data_parallel_rank(), dp_size=dp)
    return training_step.eval_loss([model], batches, num_microbatches=num_microbatches,
                                    micro_batch_size=micro_batch_size, seq_length=seq_length,
                                    forward_step=forward_step or training_step.lm_forward_step)


def training_quantizer(cfg: RunConfig, backend: str, dataset,
                       forward_step: Callable | None = None) -> Callable | None:
    """What a training stage applies to its model before DDP wraps it for QAT (None when
    the ``quant`` section is off): PTQ in ``quant.format``, calibrated on the first
    ``quant.calibration_samples`` of ``dataset`` (the stage's training data) through the
    stage's ``forward_step``."""
    quant = cfg.quant
    if not quant.enabled:
        return None
    calibrate = partial(mean_loss, dataset=dataset, samples=quant.calibration_samples,
                        micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.seq_length,
                        forward_step=forward_step)
    return partial(quantize, name=quant.format, layers=cfg.model.layer_pattern.layers,
                   backend=backend, forward_loop=calibrate)


def save_quantized(model, directory: str | Path, *, name: str, source: str | Path) -> Path:
    """Save the quantized ``model`` (format ``name``) as a checkpoint in ``directory``, with
    the meta.json and config.yaml of ``source``, the checkpoint it was loaded from."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    from megatron_hybrid.checkpoint.dist_checkpoint import META, read_meta, save_weights
    from megatron_hybrid.checkpoint.hf_checkpoint import copy_tokenizer_files

    directory, source = Path(directory), Path(source)
    meta = {**read_meta(source), QUANTIZATION_META: {"format": name}}
    meta.pop("train_state", None)  # a new model, not a point of the source's run to resume
    save_weights([model], directory)
    save_sharded_modelopt_state([model], str(directory))
    (directory / META).write_text(json.dumps(meta, indent=2))
    copy_tokenizer_files(source, directory)  # a converted checkpoint's tokenizer
    if (source / "config.yaml").is_file():  # a trained one's run
        shutil.copy(source / "config.yaml", directory / "config.yaml")
    return directory


def load_quantized(model, directory: str | Path) -> object:
    """``model`` (built from the checkpoint's meta) quantized and loaded as
    :func:`save_quantized` left it in ``directory``."""
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import (
        restore_sharded_modelopt_state,
    )

    from megatron_hybrid.checkpoint.dist_checkpoint import load_weights

    formats.register_cpu_kernels()  # a cpu-backend NVFP4 model names the torch kernel
    chunks = [model]
    restore_sharded_modelopt_state(chunks, str(directory))
    load_weights(chunks, directory)
    return _with_cached_attention(chunks[0])
