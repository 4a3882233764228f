"""``parallel.tp_comm_overlap``: the runs that cannot have it are refused in one line, and the
others set up Transformer Engine's userbuffers with the shape, TP size and precision of the run.
Transformer Engine cannot be installed here, so its ``initialize_ub`` / ``destroy_ub`` are
recording stand-ins; everything of this project between the recipe and them is real."""

import enum
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.recipe import load_recipe

backends.install("cpu")

from megatron_hybrid.engine import training_loop  # noqa: E402  (after the backend)
from megatron_hybrid.model import build  # noqa: E402
from megatron_hybrid.parallel.process_groups import ParallelDims  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NANO_V2 = RECIPES / "nemotron_nano_v2" / "pretrain_12b.yaml"  # cuda, tp 4, SP, fp8-nano-v2
TINY = RECIPES / "tiny" / "pretrain.yaml"
OVERLAP = "parallel.tp_comm_overlap=true"


class UserBufferQuantizationMode(enum.Enum):  # Transformer Engine >= 2.7 has this enum
    NONE = "none"
    FP8 = "fp8"


@pytest.fixture
def transformer_engine(monkeypatch):
    """Recording stand-ins for transformer_engine.pytorch.module.base (a GPU package); the
    returned module records ``initialize_ub``'s keyword arguments and ``destroy_ub``'s calls."""
    base = types.ModuleType("transformer_engine.pytorch.module.base")
    base.initialized, base.destroyed = [], 0

    def initialize_ub(**kwargs):
        base.initialized.append(kwargs)

    def destroy_ub():
        base.destroyed += 1

    base.initialize_ub, base.destroy_ub = initialize_ub, destroy_ub
    for name in ("transformer_engine", "transformer_engine.pytorch",
                 "transformer_engine.pytorch.module"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, base.__name__, base)
    return base


def buffers(cfg):
    dims = ParallelDims(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp)
    return build.tp_comm_overlap_buffers(cfg.model, training_loop.model_layout(cfg, dims),
                                         seq_length=cfg.seq_length,
                                         micro_batch_size=cfg.train.micro_batch_size)


def test_fp8_run_gets_buffers_of_its_shape_in_fp8_and_bf16(transformer_engine, monkeypatch):
    monkeypatch.setattr(transformer_engine, "UserBufferQuantizationMode",
                        UserBufferQuantizationMode, raising=False)
    cfg = load_recipe(NANO_V2, [OVERLAP, "train.micro_batch_size=2", "parallel.cp=2"])
    with buffers(cfg):
        (call,) = transformer_engine.initialized
        assert transformer_engine.destroyed == 0
    assert transformer_engine.destroyed == 1  # a later session may initialise again
    # seq_length * micro_batch_size / cp rows of hidden_size (Megatron-LM's shape)
    assert call["shape"] == [8192 * 2 // 2, 5120] == [8192, cfg.model.hidden_size]
    assert call["tp_size"] == 4
    # fp8-nano-v2 keeps two layers at each end in bf16: those need bf16 buffers
    assert call["quantization_modes"] == [UserBufferQuantizationMode.FP8,
                                          UserBufferQuantizationMode.NONE]
    assert call["dtype"] == torch.bfloat16
    assert call["bootstrap_backend"] == "nccl" and call["ub_cfgs"] is None


@pytest.mark.parametrize("precision, use_fp8", [("fp8-nano-v2", True), ("bf16", False)])
def test_transformer_engine_before_2_7_gets_use_fp8(transformer_engine, precision, use_fp8):
    cfg = load_recipe(NANO_V2, [OVERLAP, f"train.precision={precision}"])
    with buffers(cfg):
        pass
    (call,) = transformer_engine.initialized
    assert call["use_fp8"] is use_fp8 and "quantization_modes" not in call
    assert call["shape"] == [8192, 5120] and call["tp_size"] == 4


def test_bf16_run_gets_bf16_buffers_only(transformer_engine, monkeypatch):
    monkeypatch.setattr(transformer_engine, "UserBufferQuantizationMode",
                        UserBufferQuantizationMode, raising=False)
    with buffers(load_recipe(NANO_V2, [OVERLAP, "train.precision=bf16"])):
        pass
    (call,) = transformer_engine.initialized
    assert call["quantization_modes"] == [UserBufferQuantizationMode.NONE]


def test_no_buffers_without_the_overlap(transformer_engine):
    with buffers(load_recipe(NANO_V2, [])):
        pass
    assert transformer_engine.initialized == [] and transformer_engine.destroyed == 0


@pytest.mark.parametrize("recipe, overrides, message", [
    (NANO_V2, [OVERLAP, "model.transformer_impl=local", "train.precision=bf16"],
     "parallel.tp_comm_overlap=true needs Transformer Engine's userbuffers, which "
     "model.transformer_impl=local does not use: set parallel.tp_comm_overlap=false"),
    (TINY, [OVERLAP, "parallel.backend=cpu", "parallel.tp=2",
            "parallel.sequence_parallel=true"],
     "parallel.tp_comm_overlap=true needs parallel.backend=cuda: set "
     "parallel.tp_comm_overlap=false"),
    (NANO_V2, [OVERLAP, "parallel.sequence_parallel=false"],
     "parallel.tp_comm_overlap=true needs sequence parallel: set "
     "parallel.sequence_parallel=true (and tp > 1)"),
])
def test_runs_that_cannot_overlap_are_refused_in_one_line(recipe, overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_recipe(recipe, overrides).validate()
    assert str(refused.value) == message
