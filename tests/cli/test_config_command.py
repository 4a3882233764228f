"""``megatron-hybrid config``: the Megatron-Core settings a recipe resolves to, with no GPU.

The published recipes run with ``--backend cuda --json`` on this CPU machine; from the JSON:
the layer class of every layer kind follows ``model.transformer_impl`` (prune and distill build
the local spec by themselves) and full recompute gives every layer kind its recomputed class.
"""

import json
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid import backends, cli

backends.install("cpu")
# Megatron-Core's first import enables faulthandler on sys.stderr, which has no file descriptor
# inside a captured test: import it here, before any case runs, whatever the order.
from megatron_hybrid import mcore  # noqa: E402, F401

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = str(RECIPES / "tiny" / "pretrain.yaml")
PUBLISHED = RECIPES / "nemotron_nano_v2"
SPEC_OF_PUBLISHED = {  # recipe -> (spec built on cuda, full recompute)
    "pretrain_12b.yaml": ("transformer_engine", False),
    "long_context_128k.yaml": ("transformer_engine", True),
    "sft.yaml": ("transformer_engine", False),
    "dpo.yaml": ("transformer_engine", False),
    "prune_12b_to_9b.yaml": ("local", False),  # ModelOpt converts only the local spec
    "distill_9b.yaml": ("local", False),
    "sft_lora.yaml": ("local", False),  # LoRA adapts the local spec's linears
}
LAYER_CLASSES = {  # spec -> layer kind -> Megatron-Core's class
    "transformer_engine": {"mamba": "megatron.core.ssm.mamba_layer.MambaLayer",
                           "attention": "megatron.core.transformer.transformer_layer."
                                        "TransformerLayer",
                           "mlp": "megatron.core.ssm.mlp_layer.MLPLayer",
                           "moe": "megatron.core.transformer.transformer_layer."
                                  "MoETransformerLayer"},
    "local": {"mamba": "megatron.core.ssm.mamba_layer.MambaLayer",
              **{kind: "megatron.core.transformer.transformer_layer.TransformerLayer"
                 for kind in ("attention", "mlp", "moe")}},
}
FINAL_NORM = {"transformer_engine": "megatron.core.extensions.transformer_engine.TENorm",
              "local": "megatron_hybrid.model.specs.TorchRMSNorm"}


def config_json(capsys, recipe: str, *args) -> dict:
    assert cli.main(["config", recipe, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_spec(spec: dict, implementation: str, recomputed: bool) -> None:
    assert spec["implementation"] == implementation
    assert spec["final_norm"] == FINAL_NORM[implementation]
    for kind, expected in LAYER_CLASSES[implementation].items():
        built = pydoc.locate(spec["layers"][kind])
        assert built is not None, spec["layers"][kind]
        if recomputed:
            from megatron_hybrid.model import stack

            assert issubclass(built, stack.RecomputedLayer), (kind, built)
            assert built.__mro__[2] is pydoc.locate(expected), (kind, built.__mro__)
        else:
            assert spec["layers"][kind] == expected, kind


def test_every_published_recipe_is_covered():
    assert sorted(SPEC_OF_PUBLISHED) == sorted(
        path.name for path in PUBLISHED.glob("*.yaml") if path.name != "pipeline.yaml")


@pytest.mark.parametrize("recipe", sorted(SPEC_OF_PUBLISHED))
def test_published_recipe_on_cuda(capsys, recipe):
    settings = config_json(capsys, str(PUBLISHED / recipe), "--backend", "cuda")
    assert list(settings) == ["transformer", "ddp", "optimizer", "spec", "env"]
    implementation, recomputed = SPEC_OF_PUBLISHED[recipe]
    assert_spec(settings["spec"], implementation, recomputed)
    assert (settings["transformer"]["recompute_granularity"] == "full") == recomputed
    # The fields the precision and performance settings are asserted on elsewhere.
    assert {"fp8", "fp8_recipe", "gradient_accumulation_fusion", "bias_activation_fusion",
            "cross_entropy_loss_fusion"} <= set(settings["transformer"])
    assert {"overlap_grad_reduce", "overlap_param_gather", "fp8_param_gather"} <= set(
        settings["ddp"])
    assert all(isinstance(value, str) for value in settings["env"].values())


FP8_OF_PUBLISHED = {
    # recipe: (fp8, fp8_recipe, bf16 layers at each end), docs/performance.md cites the sources
    PUBLISHED / "pretrain_12b.yaml": ("e4m3", "blockwise", 2),
    PUBLISHED.parent / "nemotron_h" / "pretrain_56b.yaml": ("hybrid", "tensorwise", 2),
}


@pytest.mark.parametrize("recipe", FP8_OF_PUBLISHED, ids=lambda path: path.name)
def test_config_shows_the_published_fp8_recipe_and_gpu_defaults(capsys, recipe):
    settings = config_json(capsys, str(recipe), "--backend", "cuda")
    transformer, ddp, env = settings["transformer"], settings["ddp"], settings["env"]
    fp8, scaling, bf16_layers = FP8_OF_PUBLISHED[recipe]
    assert (transformer["fp8"], transformer["fp8_recipe"]) == (fp8, scaling)
    assert transformer["first_last_layers_bf16"] is True
    assert (transformer["num_layers_at_start_in_bf16"],
            transformer["num_layers_at_end_in_bf16"]) == (bf16_layers, bf16_layers)
    assert transformer["fp8_param"] is True and ddp["fp8_param_gather"] is True
    for fusion in ("cross_entropy_loss_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
                   "persist_layer_norm"):
        assert transformer[fusion] is True, fusion
    assert ddp["overlap_grad_reduce"] is True and ddp["overlap_param_gather"] is True
    assert settings["optimizer"]["use_distributed_optimizer"] is True
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # tensor parallel


def test_the_cpu_backend_keeps_its_own_settings(capsys):
    settings = config_json(capsys, TINY)
    assert not any(settings["transformer"][fusion] for fusion in (
        "cross_entropy_loss_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
        "gradient_accumulation_fusion"))
    assert settings["ddp"]["overlap_grad_reduce"] is False


@pytest.mark.parametrize("implementation", ["local", "transformer_engine"])
def test_transformer_impl_and_full_recompute_override_the_recipe(capsys, implementation):
    settings = config_json(capsys, str(PUBLISHED / "pretrain_12b.yaml"),
                           f"model.transformer_impl={implementation}", "train.recompute=full",
                           "train.precision=bf16",  # FP8 needs Transformer Engine's layers
                           "--backend", "cuda")
    assert settings["spec"]["transformer_impl"] == implementation
    assert_spec(settings["spec"], implementation, recomputed=True)


def test_cpu_backend_builds_the_local_spec_for_either_value(capsys):
    for implementation in ("transformer_engine", "local"):
        settings = config_json(capsys, TINY, f"model.transformer_impl={implementation}")
        assert_spec(settings["spec"], "local", recomputed=False)
        assert settings["ddp"]["overlap_grad_reduce"] is False


def test_human_output_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "megatron_hybrid", "config", TINY,
                             "train.recompute=full"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:3] == ["tiny-pretrain on backend=cpu (resolved, nothing built)",
                         "spec: transformer_impl=transformer_engine -> local",
                         "  mamba      RecomputedMambaLayer"]
    for heading in ("transformer (TransformerConfig", "ddp (DistributedDataParallelConfig",
                    "optimizer (OptimizerConfig", "env (set by the launcher"):
        assert any(line.startswith(heading) for line in lines), heading
    assert "  recompute_granularity=full" in result.stdout.replace("\n", "  ")


@pytest.mark.parametrize("args, message", [
    (["model.transformer_impl=te"],
     "model.transformer_impl='te': choose one of transformer_engine, local"),
    ([str(PUBLISHED / "sft.yaml"), "--backend", "cpu"], "set train.precision=fp32"),
])
def test_bad_input_is_one_line(capsys, args, message):
    recipe = [] if args[0].endswith(".yaml") else [TINY]
    assert cli.main(["config", *recipe, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-hybrid config: error: "), lines
    assert message in lines[0]
