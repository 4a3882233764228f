"""LoRA adapters <-> Hugging Face PEFT adapter directories (``adapter_config.json`` +
``adapter_model.safetensors``) for ``NemotronHForCausalLM``, written without the ``peft``
package.

PEFT names a LoRA factor ``base_model.model.<HF module>.lora_A.weight`` (A [r, in]) and
``.lora_B.weight`` (B [out, r]), with ``<HF module>`` the HF names of ``model/hf_mapping.py``.
Megatron's fused QKV is three HF modules: its B splits by output rows as the fused weight does
(q, k, v rows of each query group), and its A, shared by the three, is written to each.
Importing fuses them back and refuses q/k/v adapters whose A differ (no fused LoRA computes
them). peft 0.21 refuses LoRA on a NemotronH Mamba ``out_proj``, so such adapters are not
exported, nor are an MoE model's (see :func:`export_lora`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_hybrid.checkpoint import dist_checkpoint, sharded_io
from megatron_hybrid.checkpoint.hf_checkpoint import staged_directory
from megatron_hybrid.model import hf_mapping
from megatron_hybrid.model.config import ModelConfig, PeftConfig
from megatron_hybrid.model.hf_mapping import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _adapted_entries(cfg: ModelConfig, adapted: set[str]) -> list[tuple]:
    """(Megatron A name, Megatron B name, HF module names) of every adapted linear."""
    entries = []
    for entry in hf_mapping.weight_map(cfg):
        module = entry.mcore.removesuffix(".weight")
        if f"{module}.lora_A" in adapted:
            hf_modules = tuple(PEFT_PREFIX + name.removesuffix(".weight") for name in entry.hf)
            entries.append((f"{module}.lora_A", f"{module}.lora_B", hf_modules, entry))
    return entries


def peft_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """PEFT's tensors from full (TP=1) Megatron adapter tensors ``state``."""
    out = {}
    for a_name, b_name, hf_modules, entry in _adapted_entries(cfg, set(state)):
        for module, b_part in zip(hf_modules, entry.split(state[b_name])):
            out[f"{module}.lora_A.weight"] = state[a_name].clone()  # one copy per module
            out[f"{module}.lora_B.weight"] = b_part.contiguous()
    return out


def adapter_config(peft: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict:
    """PEFT's LoraConfig fields for ``tensors``: the HF module names they adapt."""
    targets = sorted({name.split(".")[-3] for name in tensors})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": peft.rank,
            "lora_alpha": peft.alpha, "lora_dropout": peft.dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "modules_to_save": None, "base_model_name_or_path": None}


def export_lora(checkpoint_dir, out) -> Path:
    """The adapters of LoRA checkpoint ``checkpoint_dir`` as a new PEFT directory ``out``."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = dist_checkpoint.read_meta(checkpoint_dir)
    if "peft" not in meta:
        raise ConversionError(f"{checkpoint_dir} holds no LoRA adapters (its meta.json has no "
                              f"peft section): give a checkpoint of a run with peft.method=lora")
    cfg, peft = ModelConfig(**meta["model"]), PeftConfig(**meta["peft"])
    if "E" in cfg.layer_pattern.layers:
        raise ConversionError(f"{checkpoint_dir} is of an MoE model (pattern {cfg.pattern!r}), "
                              f"whose routed experts HF NemotronH holds as fused [experts, out, "
                              f"in] tensors that peft's LoRA modules cannot adapt: use the "
                              f"adapters from this checkpoint (inference loads them) or export "
                              f"them merged (megatron-hybrid convert mcore-to-hf --merge)")
    if "out_proj" in peft.target_modules:
        raise ConversionError(f"{checkpoint_dir} adapts Mamba out_proj, which peft refuses on "
                              f"NemotronH (its fused kernels read the weight directly): merge "
                              f"the adapters into the model instead, or train without out_proj")
    with sharded_io.open_checkpoint(checkpoint_dir, cfg, peft) as reader:
        names = [name for name in reader.entries if name.endswith(("lora_A", "lora_B"))]
        tensors = peft_tensors(reader.load(names), cfg)
    with staged_directory(out) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config(peft, tensors), indent=2) + "\n")
    return Path(out)


def import_lora(adapter_dir, cfg: ModelConfig) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """A PEFT adapter directory for ``cfg``'s model as the ``peft`` section and the full
    (TP=1) Megatron adapter tensors, which ``model.load_state_dict(..., strict=False)`` of a
    model built with that section takes."""
    adapter_dir = Path(adapter_dir)
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    state, kinds = {}, set()
    for a_name, b_name, hf_modules, entry in _adapted_entries(cfg, _all_adapters(cfg)):
        a_parts = [tensors.pop(f"{module}.lora_A.weight", None) for module in hf_modules]
        b_parts = [tensors.pop(f"{module}.lora_B.weight", None) for module in hf_modules]
        if all(part is None for part in a_parts + b_parts):
            continue
        if any(part is None for part in a_parts + b_parts) or any(
                not torch.equal(part, a_parts[0]) for part in a_parts):
            raise ConversionError(f"{adapter_dir}: {', '.join(hf_modules)} must all be adapted, "
                                  f"with one lora_A, to fuse into {entry.mcore}")
        state[a_name], state[b_name] = a_parts[0], entry.fuse(b_parts)
        kinds.add(_KINDS[a_name.split(".")[-2]])
    if tensors:
        raise ConversionError(f"{adapter_dir}: tensors of no adapted linear of this model "
                              f"{hf_mapping.preview(sorted(tensors))}")
    peft = PeftConfig(method="lora", rank=raw["r"], alpha=float(raw["lora_alpha"]),
                      dropout=float(raw.get("lora_dropout", 0.0)),
                      target_modules=sorted(kinds))
    peft.validate()
    return peft, state


_KINDS = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1",
          "linear_fc2": "fc2", "in_proj": "in_proj", "out_proj": "out_proj"}
"""Megatron module name -> the LoRA target kind (``peft.target_modules``)."""


def _all_adapters(cfg: ModelConfig) -> set[str]:
    """Every adapter name a model of ``cfg`` can have."""
    return {entry.mcore.removesuffix(".weight") + ".lora_A"
            for entry in hf_mapping.weight_map(cfg)
            if entry.mcore.split(".")[-2] in _KINDS}
