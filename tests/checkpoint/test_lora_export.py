"""The LoRA round trip to Hugging Face: a real LoRA fine-tune of a tiny model (SFT steps, so
the adapters are trained, not drawn), its base exported with ``convert mcore-to-hf`` and its
adapters with ``convert lora-to-peft``; ``peft.PeftModel.from_pretrained`` on HF's own
``NemotronHForCausalLM`` (fp32, HF's torch code) then gives this project's logits, as does
the ``--merge`` export alone. Without ``--merge`` the adapters are left out, said in one line
on stderr."""

import pytest
import torch
from test_adapters import MODEL, sft_lora_run
from test_hf_parity import PUBLISHED_DT_MIN, load_hf_torch_reference

from megatron_hybrid import cli
from megatron_hybrid.checkpoint import dist_checkpoint, hf_checkpoint
from megatron_hybrid.model.build import ModelLayout, build_model
from megatron_hybrid.model.config import PeftConfig
from megatron_hybrid.parallel import process_groups

TOLERANCE = 1e-4
CFG = MODEL.replace(mamba_dt_clamp_min=PUBLISHED_DT_MIN)  # HF's dt clamp binds, as published
TOKENS = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """(checkpoint of 4 LoRA SFT steps, our logits of it)."""
    out = tmp_path_factory.mktemp("sft-lora")
    sft_lora_run(CFG, out, steps=4)
    checkpoint = out / "checkpoints" / "step_000004"
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    try:
        peft = PeftConfig(**dist_checkpoint.read_meta(checkpoint)["peft"])
        model = build_model(CFG, ModelLayout(), backend="cpu", peft=peft)
        dist_checkpoint.load_weights([model], checkpoint)
        trained = [p for name, p in model.named_parameters() if name.endswith("lora_B")]
        assert all(p.abs().max() > 0 for p in trained)  # every B left zero by training
        with torch.no_grad():
            logits = model.eval()(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)
    finally:
        process_groups.destroy_distributed()
    return checkpoint, logits


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS, use_cache=False).logits


def test_peft_on_the_exported_base_gives_our_logits(fine_tuned, tmp_path, capfd):
    from peft import PeftModel

    checkpoint, ours = fine_tuned
    assert cli.main(["convert", "mcore-to-hf", str(checkpoint), str(tmp_path / "base")]) == 0
    assert cli.main(["convert", "lora-to-peft", str(checkpoint), str(tmp_path / "adapter")]) == 0
    notice = [line for line in capfd.readouterr().err.splitlines() if "LoRA" in line]
    assert notice == [f"{checkpoint} holds LoRA adapters: wrote the base weights without them "
                      f"(export them with convert lora-to-peft, or merge them with --merge)"]
    base = load_hf_torch_reference().NemotronHForCausalLM.from_pretrained(tmp_path / "base")
    base_logits = hf_logits(base)
    adapted = hf_logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter")))
    print(f"max |HF base + peft - ours| = {(adapted - ours).abs().max().item():.2e}")
    assert (adapted - ours).abs().max() < TOLERANCE
    assert (base_logits - ours).abs().max() > 100 * TOLERANCE  # control: the training matters


def test_merged_export_alone_gives_our_logits(fine_tuned, tmp_path):
    checkpoint, ours = fine_tuned
    converted = hf_checkpoint.export_hf(checkpoint, tmp_path / "merged", merge=True)
    assert converted.adapters == "merged"
    merged = load_hf_torch_reference().NemotronHForCausalLM.from_pretrained(tmp_path / "merged")
    logits = hf_logits(merged)
    print(f"max |HF merged - ours| = {(logits - ours).abs().max().item():.2e}")
    assert (logits - ours).abs().max() < TOLERANCE
