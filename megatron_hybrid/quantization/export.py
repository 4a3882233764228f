"""Quantized Hugging Face NemotronH checkpoints of a quantized model, for deployment.

``vllm`` (the default): ModelOpt's unified HF export (``export_mcore_gpt_to_hf``): the
quantized linears' weights in the format (FP8 E4M3; NVFP4 as packed E2M1 pairs with an E4M3
scale per 16 and a per-tensor ``weight_scale_2``; ...) with their ``weight_scale`` and
``input_scale``, everything else in bf16, and ``hf_quant_config.json`` (quant_algo, the
``exclude_modules`` left in bf16), also as config.json's ``quantization_config``
(``quant_method: modelopt``). vLLM and TensorRT-LLM serve this format; HF transformers 5.23
does not know ``modelopt`` and would skip the scales.

``transformers`` (fp8 only): the same weights in transformers' own FP8 format
(``quant_method: fp8``): each per-tensor weight scale as a 128 x 128 block grid
(``weight_scale_inv``, the factor dequantization multiplies by), no input scales (transformers
quantizes activations dynamically on a GPU; on a CPU it dequantizes the weights to bf16 on
load). ``AutoModelForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_hybrid.errors import ConfigError, check_choice

TARGETS = ("vllm", "transformers")
FP8_BLOCK = 128
"""transformers' FP8 block size (its default ``weight_block_size``)."""


def check_target(target: str, name: str) -> None:
    """Refuse, in one line, an export target the format has no layout for."""
    check_choice("--hf-target", target, TARGETS)
    if target == "transformers" and name != "fp8":
        raise ConfigError(f"--hf-target transformers writes transformers' FP8 format, not "
                          f"{name}: use --format fp8, or --hf-target vllm")


def export_hf(model, model_cfg, out: str | Path, *, tokenizer_json: Path, name: str,
              target: str = "vllm") -> Path:
    """Write the quantized ``model`` (format ``name``, whole on this rank) as a new HF
    directory ``out`` for ``target``, with the model's ``tokenizer_json``."""
    import shutil

    from modelopt.torch.export import export_mcore_gpt_to_hf

    from megatron_hybrid.checkpoint.hf_checkpoint import staged_directory
    from megatron_hybrid.model.hf_mapping import hf_config_from_model

    check_target(target, name)
    # ModelOpt rounds in the export dtype: the model's own (bf16 on GPUs, fp32 on the cpu
    # backend) gives the weights the model computed with; a bf16 pass first would round twice
    dtype = model.config.params_dtype
    with staged_directory(out) as staging, tempfile.TemporaryDirectory() as base:
        # ModelOpt reads the HF config and tokenizer from a "pretrained" directory
        hf_config_from_model(model_cfg, architectures=["NemotronHForCausalLM"]).save_pretrained(
            base)
        shutil.copy(tokenizer_json, Path(base) / "tokenizer.json")
        with _fp4_probe_without_cuda():
            export_mcore_gpt_to_hf(model, base, export_dir=str(staging), dtype=dtype)
        if target == "transformers":
            to_transformers_fp8(staging)
    return Path(out)


@contextlib.contextmanager
def _fp4_probe_without_cuda() -> Iterator[None]:
    """ModelOpt's NVFP4 packing asks ``torch.cuda`` for the GPU's capability (to try
    TensorRT-LLM's kernel) before anything else, which raises on a torch built without CUDA:
    there the probe answers "no FP4 GPU" and the PyTorch packing runs."""
    import torch
    from modelopt.torch.quantization.qtensor import nvfp4_tensor

    if torch.cuda.is_available():
        yield
        return
    probe = nvfp4_tensor.fp4_compatible
    nvfp4_tensor.fp4_compatible = lambda: False
    try:
        yield
    finally:
        nvfp4_tensor.fp4_compatible = probe


def to_transformers_fp8(directory: Path) -> None:
    """Rewrite ModelOpt's FP8 export in ``directory`` as transformers' FP8 format."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(directory / shard)
        save_file(_fp8_tensors(tensors), directory / shard, metadata={"format": "pt"})
    index["weight_map"] = {_fp8_name(key): shard for key, shard in index["weight_map"].items()
                           if not key.endswith(".input_scale")}
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "modules_to_not_convert": config["quantization_config"]["ignore"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "hf_quant_config.json").unlink()  # vLLM would read it as ModelOpt's format


def _fp8_name(key: str) -> str:
    return f"{key}_inv" if key.endswith(".weight_scale") else key


def _fp8_tensors(tensors: dict) -> dict:
    """Per-tensor ``weight_scale`` -> a ``weight_scale_inv`` block grid; no ``input_scale``."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".input_scale"):
            continue
        if key.endswith(".weight_scale"):
            rows, cols = tensors[key.removesuffix("_scale")].shape
            grid = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
            tensor = tensor.float().reshape(1, 1).expand(grid).contiguous()
        out[_fp8_name(key)] = tensor
    return out
