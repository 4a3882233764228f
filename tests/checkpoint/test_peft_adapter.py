"""LoRA adapters exported in the PEFT format: ``peft.PeftModel.from_pretrained`` on HF's own
``NemotronHForCausalLM`` (fp32, the tiny model of test_hf_parity with the published
time_step_min) gives this project's logits, and importing the adapter gives back the same
tensors and ``peft`` section."""

import json

import pytest
import torch
from test_hf_parity import (  # noqa: F401  (fixtures)
    build_hf,
    cfg,
    hf_config,
    hf_module,
    hf_weights,
    ids,
    model_parallel,
)

from megatron_hybrid.checkpoint import dist_checkpoint, peft_adapter
from megatron_hybrid.model import adapters, hf_mapping
from megatron_hybrid.model.build import ModelLayout, build_model
from megatron_hybrid.model.config import PeftConfig
from megatron_hybrid.model.hf_mapping import ConversionError

PEFT = PeftConfig(method="lora", rank=4, alpha=8.0)  # every kind peft takes on NemotronH
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lora_model(cfg, hf_weights):
    """Our model with the HF weights and random adapters (A and B non-zero)."""
    model = build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False,
                        peft=PEFT)
    missing, unexpected = model.load_state_dict(
        hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg), strict=False)
    assert not unexpected and all(adapters.is_adapter_parameter(k) or k.endswith("_extra_state")
                                  for k in missing)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, linear in adapters.lora_linears(model):
            for factor in (linear.lora_A, linear.lora_B):
                factor.copy_(torch.randn(factor.shape, generator=generator)
                             / factor.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(lora_model, cfg, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("lora") / "step_000001"
    dist_checkpoint.save_weights([lora_model], checkpoint)
    (checkpoint / dist_checkpoint.META).write_text(json.dumps(
        {"model": cfg.to_dict(), "peft": PEFT.to_dict()}))
    return peft_adapter.export_lora(checkpoint, checkpoint.parent / "adapter")


def our_logits(model):
    tokens = ids()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def test_peft_loads_the_exported_adapter_and_gives_our_logits(hf_module, hf_config, hf_weights,
                                                            lora_model, exported):
    from peft import PeftModel

    config = json.loads((exported / peft_adapter.ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                               "up_proj", "down_proj", "in_proj"])
    reference = build_hf(hf_module, hf_config, hf_weights).eval()
    with torch.no_grad():
        base_logits = reference(input_ids=ids(), use_cache=False).logits
    adapted = PeftModel.from_pretrained(reference, str(exported)).eval()
    # M-M*-M-: 3 Mamba (in_proj), 3 MLP (up, down), 1 attention (q, k, v, o).
    assert sum("lora_A" in name for name, _ in adapted.named_parameters()) == 13
    with torch.no_grad():
        hf_logits = adapted(input_ids=ids(), use_cache=False).logits
    ours = our_logits(lora_model)
    print(f"max |HF+peft - ours| = {(hf_logits - ours).abs().max().item():.2e}")
    assert (hf_logits - ours).abs().max() < TOLERANCE
    assert (base_logits - ours).abs().max() > 100 * TOLERANCE  # control: the adapters matter


def test_import_gives_back_the_adapters_and_the_section(cfg, lora_model, exported):
    peft, state = peft_adapter.import_lora(exported, cfg)
    assert peft == PeftConfig(method="lora", rank=4, alpha=8.0,
                              target_modules=sorted(PEFT.target_modules))
    ours = {name: p for name, p in lora_model.named_parameters()
            if adapters.is_adapter_parameter(name)}
    assert state.keys() == ours.keys()
    assert all(torch.equal(state[name], ours[name]) for name in ours)


def test_qkv_adapters_with_different_a_are_refused(cfg, exported, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(exported / peft_adapter.ADAPTER_WEIGHTS))
    name = "base_model.model.model.layers.3.mixer.k_proj.lora_A.weight"
    tensors[name] = tensors[name] + 1
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / peft_adapter.ADAPTER_WEIGHTS))
    (broken / peft_adapter.ADAPTER_CONFIG).write_text(
        (exported / peft_adapter.ADAPTER_CONFIG).read_text())
    with pytest.raises(ConversionError, match="with one lora_A, to fuse into"):
        peft_adapter.import_lora(broken, cfg)


@pytest.mark.parametrize("peft, message", [
    (None, "holds no LoRA adapters"),
    (PeftConfig(method="lora", target_modules=["out_proj"]), "adapts Mamba out_proj"),
])
def test_what_peft_cannot_load_is_refused_in_one_line(cfg, tmp_path, peft, message):
    (tmp_path / "metadata.json").write_text("{}")
    meta = {"model": cfg.to_dict(), **({"peft": peft.to_dict()} if peft else {})}
    (tmp_path / dist_checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match=message):
        peft_adapter.export_lora(tmp_path, tmp_path / "out")
