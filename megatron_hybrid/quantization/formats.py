"""The quantization formats, their ModelOpt configs, and which layers stay in bf16.

Each format is one of ModelOpt's PTQ configs (``mtq.FP8_DEFAULT_CFG`` and so on) with the
exclusions of NVIDIA's published quantized Nemotron checkpoints added (docs/quantization.md
cites them):

- every format keeps the embedding, the output layer (lm_head), the norms, the Mamba conv1d
  and SSM parameters (none of them is a linear; ModelOpt's defaults already skip conv1d and
  the output layer) and every attention layer (``linear_qkv``, ``linear_proj``) in bf16, as
  NVIDIA-Nemotron-Nano-9B-v2-FP8 does (Mamba and MLP linears in FP8, its 4 attention layers
  and the conv1d not);
- the 4-bit formats (nvfp4, int4_awq) also keep the Mamba layer that feeds each attention
  layer (its ``in_proj`` and ``out_proj``), as the ``exclude_modules`` of
  NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4's ``hf_quant_config.json`` do.

ModelOpt's NVFP4 fake quantization runs only as a CUDA kernel (its dynamic block quantizer
asserts a CUDA ``amax``); on the cpu backend the quantizers use :func:`nvfp4_fake_quant`, the
same rounding built from the steps of ModelOpt's ``NVFP4QTensor`` (the one its export uses),
so the exported NVFP4 weights dequantize to exactly the weights the cpu backend computed with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron_hybrid.errors import check_choice


@dataclass(frozen=True)
class Format:
    modelopt_config: str
    """The name of ModelOpt's config in ``modelopt.torch.quantization``."""
    weight_bytes: float
    """Bytes a quantized weight takes, its share of the scales included."""
    keeps_mamba_before_attention: bool
    """Keep the Mamba layer feeding each attention layer in bf16 (the 4-bit formats, as
    NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4; the 8-bit ones as NVIDIA-Nemotron-Nano-9B-v2-FP8)."""
    block: int | None = None
    """Inputs are scaled in blocks of this many along a linear's input width; a linear whose
    width is not a multiple stays in bf16 (ModelOpt packs whole blocks only)."""


FORMATS = {
    "fp8": Format("FP8_DEFAULT_CFG", 1.0, False),
    "nvfp4": Format("NVFP4_DEFAULT_CFG", 0.5 + 1 / 16, True, block=16),
    "int8_sq": Format("INT8_SMOOTHQUANT_CFG", 1.0, False),
    "int4_awq": Format("INT4_AWQ_CFG", 0.5 + 2 / 128, True),
}
"""nvfp4: 4-bit E2M1 values and an E4M3 scale per 16; int4_awq: 4 bits and a bf16 scale per
128; fp8 and int8_sq: one byte and a per-tensor (per-channel) scale."""

BF16_BYTES = 2.0
ATTENTION_LINEARS = "*self_attention*"
"""Every attention layer's linears (``linear_qkv``, ``linear_proj``) stay in bf16."""
CPU_NVFP4_BACKEND = "megatron_hybrid_nvfp4_torch"
"""The name :func:`nvfp4_fake_quant` is registered under as a ModelOpt quantization backend."""


def get_format(name: str) -> Format:
    check_choice("format", name, tuple(FORMATS))
    return FORMATS[name]


def weight_bytes(name: str) -> float:
    """Bytes per quantized weight of ``name`` ("bf16" too), for memory plans."""
    return BF16_BYTES if name == "bf16" else get_format(name).weight_bytes


def bf16_mamba_layers(layers: str, name: str) -> list[int]:
    """0-based indices of the Mamba layers that stay in bf16 in format ``name``: for the
    4-bit formats the last Mamba layer before each attention layer of ``layers`` (the
    pattern's layer symbols)."""
    if not get_format(name).keeps_mamba_before_attention:
        return []
    kept, last_mamba = set(), None
    for index, symbol in enumerate(layers):
        if symbol == "M":
            last_mamba = index
        elif symbol == "*" and last_mamba is not None:
            kept.add(last_mamba)
    return sorted(kept)


def quant_config(name: str, model, layers: str, *, backend: str) -> dict:
    """ModelOpt's config of format ``name`` for this rank's ``model`` (its decoder layers
    carry 1-based global ``layer_number``s into ``layers``, the whole pattern), with the
    published checkpoints' bf16 layers disabled; on the cpu backend NVFP4 runs
    :func:`nvfp4_fake_quant`."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, get_format(name).modelopt_config))
    quant_cfg = config["quant_cfg"]
    quant_cfg[ATTENTION_LINEARS] = {"enable": False}
    kept = set(bf16_mamba_layers(layers, name))
    for local, layer in enumerate(model.decoder.layers):
        if layer.layer_number - 1 in kept:
            quant_cfg[f"*decoder.layers.{local}.mixer.*"] = {"enable": False}
    for linear in unblockable_linears(model, get_format(name).block):
        quant_cfg[f"*{linear}.*"] = {"enable": False}
    if name == "nvfp4" and backend == "cpu":
        register_cpu_kernels()
        for key in ("*weight_quantizer", "*input_quantizer"):
            quant_cfg[key] = {**quant_cfg[key], "backend": CPU_NVFP4_BACKEND}
    return config


def unblockable_linears(model, block: int | None) -> list[str]:
    """Names of ``model``'s linears whose (this rank's) input width is not a multiple of
    ``block`` (none without blocks), e.g. a pruned FFN of 392 under NVFP4's 16."""
    from megatron_hybrid import mcore

    if block is None:
        return []
    linears = (mcore.ColumnParallelLinear, mcore.RowParallelLinear)
    return [name for name, module in model.named_modules()
            if isinstance(module, linears) and module.weight.shape[-1] % block]


def register_cpu_kernels() -> None:
    """Register :func:`nvfp4_fake_quant` with ModelOpt (once)."""
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    if not tensor_quantizer.is_registered_quant_backend(CPU_NVFP4_BACKEND):
        tensor_quantizer.register_quant_backend(CPU_NVFP4_BACKEND, nvfp4_fake_quant)


def nvfp4_fake_quant(inputs, quantizer):
    """NVFP4 fake quantization in PyTorch: a per-tensor FP32 scale from the calibrated amax
    (amax / (6 * 448)), an E4M3 scale per block of 16 and E2M1 values, each step the one of
    ModelOpt's ``NVFP4QTensor.quantize`` (whose entry asks CUDA for the GPU's capability
    first, so is not called); the gradient passes straight through (QAT)."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    with torch.no_grad():
        values = inputs.detach().float()
        amax = quantizer.amax if quantizer.amax is not None else values.abs().amax()
        global_scale = amax.float().reshape(()) / (6.0 * 448.0)
        block = FORMATS["nvfp4"].block
        block_scale, _ = NVFP4QTensor.get_weights_scaling_factor(values, block, global_scale)
        scale = (block_scale.float() * global_scale).unsqueeze(-1)
        blocks = values.reshape(*values.shape[:-1], -1, block)
        codes = NVFP4QTensor._cast_fp4(blocks / scale)
        rounded = NVFP4QTensor.get_e2m1_values(values.device)[codes.long()] * scale
    return inputs + (rounded.reshape(inputs.shape).to(inputs.dtype) - inputs).detach()
