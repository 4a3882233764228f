"""Loading a trained model to generate: a Hugging Face NemotronH directory (converted into a
temporary checkpoint on load, removed after) and the checkpoint converted from it give the
same model and tokenizer; a missing path and a layout the launched processes cannot form
are refused in one line. Its fixtures, a tiny HF directory and its checkpoint, both with the
default BPE tokenizer, serve the other inference tests."""

import shutil

import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.model.config import ModelConfig

backends.install("cpu")  # before Megatron-Core is imported

MODEL = ModelConfig(pattern="M*-M-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
                    mamba_state_dim=8, mamba_num_groups=2, vocab_size=1024, seq_length=256,
                    mamba_chunk_size=16, mamba_dt_clamp_min=0.001, init_std=0.3)
"""Attention and Mamba layers. HF's init needs a dt clamp; its weights at std 0.3 give peaked
logits (top-two gaps of 1.6e-2 and more on a 39-token text, against 2.8e-4 at std 0.02), so no
argmax hangs on rounding."""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random NemotronH in Hugging Face's format, with the default BPE tokenizer."""
    from transformers import NemotronHForCausalLM

    from megatron_hybrid.data.tokenizer import default_bpe
    from megatron_hybrid.model.hf_mapping import hf_config_from_model

    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    NemotronHForCausalLM(hf_config_from_model(MODEL)).save_pretrained(directory)
    shutil.copy(default_bpe(MODEL.vocab_size), directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory):
    """``hf_dir`` converted to a checkpoint (its tokenizer.json carried along)."""
    from megatron_hybrid.checkpoint.hf_checkpoint import import_hf

    return import_hf(hf_dir, tmp_path_factory.mktemp("converted") / "checkpoint").out


def logits_of(path, tokens):
    from megatron_hybrid.inference.loading import loaded_model

    with loaded_model(path, backend="cpu") as (model, tokenizer, model_config):
        model.eval()
        with torch.no_grad():
            return model(torch.tensor([tokens]), None, None), tokenizer.identity, model_config


def test_an_hf_directory_loads_as_its_converted_checkpoint(hf_dir, checkpoint):
    tokens = list(range(3, 40))
    from_hf, from_checkpoint = logits_of(hf_dir, tokens), logits_of(checkpoint, tokens)
    assert torch.equal(from_hf[0], from_checkpoint[0])
    assert from_hf[1:] == from_checkpoint[1:]
    assert from_hf[0].std() > 0  # a real model answered


def test_a_missing_path_and_an_impossible_layout_are_refused_in_one_line(checkpoint, tmp_path):
    from megatron_hybrid.errors import ConfigError
    from megatron_hybrid.inference.loading import loaded_model

    with pytest.raises(ConfigError, match=r"^.*nowhere does not exist: give a checkpoint "
                                          r"\(step_\*\) or a Hugging Face model directory$"):
        with loaded_model(tmp_path / "nowhere", backend="cpu"):
            pass
    with pytest.raises(ConfigError, match=r"^--tp 2 x --pp 1 needs 2 processes, got 1: launch "
                                          r"with torchrun --nproc-per-node 2$"):
        with loaded_model(checkpoint, backend="cpu", tp=2):
            pass
