"""The memory / step-time planner against the real model, the published claims, and memory
measured on the CPU.

- parameter counts per stage equal the Megatron-Core model's (built on meta);
- serving 128k tokens: nano-v2-9b fits one A10G in bf16, nano-v2-12b does not (its weights
  alone are too big); Nemotron-H-8B's KV cache is a small fraction of an all-attention twin's;
- predicted peak memory of tiny training runs on the CPU is within 10% of the CPU allocator's
  measured peak, without and with full recompute.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from megatron_hybrid import backends, plan, recipe
from megatron_hybrid.flavors import get_flavor

GIB = 2**30
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
A10G = plan.GPUS["a10g"]
CONTEXT_128K = 131072


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    code = plan.run(parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


# -- parameters --------------------------------------------------------------------------------

MOE_HYBRID = get_flavor("tiny-hybrid").replace(pattern="M*-E", num_moe_experts=4,
                                                moe_ffn_hidden_size=48)
COUNTED = {name: get_flavor(name) for name in ("nano-v2-9b", "nano-v2-12b", "nemotron-h-8b",
                                               "tiny-nano-v2-12b")}
COUNTED["moe"] = MOE_HYBRID


@pytest.fixture(scope="module")
def counted():
    backends.install("cpu")
    from megatron_hybrid.params import count_parameters

    return {name: count_parameters(cfg) for name, cfg in COUNTED.items()}


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_parameter_counts_match_the_megatron_model(counted, name):
    cfg, counts = COUNTED[name], counted[name]
    assert plan.total_parameters(cfg) == counts["total"]
    per_layer = [sum(plan.layer_parameters(cfg, s)) for s in cfg.layer_pattern.layers]
    assert per_layer == counts["per_layer"]


def test_pipeline_stages_hold_their_layers_and_the_ends(counted):
    cfg = get_flavor("tiny-nano-v2-12b")  # '|' marks stages of 18 and 17 layers
    first, last = plan.stage_parameters(cfg, tp=1, pp=2)
    per_layer = counted["tiny-nano-v2-12b"]["per_layer"]
    embedding = cfg.vocab_size * cfg.hidden_size
    assert first == sum(per_layer[:18]) + embedding
    assert last == sum(per_layer[18:]) + embedding + cfg.hidden_size
    assert first + last == plan.total_parameters(cfg)


# -- the published claims ----------------------------------------------------------------------

def test_nano_v2_9b_serves_128k_on_one_a10g_and_12b_does_not():
    nine, twelve = (plan.inference_memory(get_flavor(name), context=CONTEXT_128K)
                    for name in ("nano-v2-9b", "nano-v2-12b"))
    # Nemotron Nano 2 (arXiv 2508.14444): bf16 weights ~16.6 GiB (9B) and ~22.9 GiB (12B), ~2 GiB
    # of KV cache at 128k (4 attention layers).
    assert nine.weights / GIB == pytest.approx(16.6, abs=0.1)
    assert twelve.weights / GIB == pytest.approx(22.9, abs=0.1)
    assert nine.kv_cache / GIB == pytest.approx(2.0, abs=0.05)
    assert nine.total < A10G.usable_bytes < twelve.weights
    assert nine.ssm_state < nine.kv_cache / 10  # fixed-size state, small beside the KV cache


def test_plan_cli_answers_the_a10g_question(capsys):
    answers = {}
    for name in ("nano-v2-9b", "nano-v2-12b"):
        code, out = run_cli("--flavor", name, "--gpu", "a10g", "--json", capsys=capsys)
        assert code == 0
        answers[name] = json.loads(out)["inference"]
    assert answers["nano-v2-9b"]["fits"] and not answers["nano-v2-12b"]["fits"]
    assert answers["nano-v2-9b"]["context"] == CONTEXT_128K  # the model's own length
    _, text = run_cli("--flavor", "nano-v2-12b", "--gpu", "a10g", capsys=capsys)
    assert "does NOT fit" in text and "NVIDIA A10G" in text


def test_nemotron_h_8b_kv_cache_is_a_small_fraction_of_an_all_attention_models():
    hybrid = get_flavor("nemotron-h-8b")
    twin = plan.all_attention_counterpart(hybrid)
    assert twin.layer_pattern.counts["*"] == 28 and twin.num_layers == hybrid.num_layers
    ratio = (plan.inference_memory(hybrid, context=CONTEXT_128K).kv_cache
             / plan.inference_memory(twin, context=CONTEXT_128K).kv_cache)
    assert ratio == pytest.approx(4 / 28)  # 4 attention layers where the twin has 28


def test_long_context_recipe_fits_one_h100_node(capsys):
    path = RECIPES / "nemotron_nano_v2" / "long_context_128k.yaml"
    code, out = run_cli(str(path), "--gpus", "8", "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["layout"]["seq_length"] == 131072
    assert (report["layout"]["tp"], report["layout"]["cp"], report["layout"]["dp"]) == (4, 2, 1)
    assert report["training"]["fits"]
    # Its full recompute is what makes the 64k-token shards fit.
    code, out = run_cli(str(path), "train.recompute=none", "--gpus", "8", "--json",
                        capsys=capsys)
    assert not json.loads(out)["training"]["fits"]


def test_plan_needs_one_model_source(capsys):
    with pytest.raises(plan.PlanError, match="give a recipe or --flavor"):
        run_cli(capsys=capsys)
    with pytest.raises(plan.PlanError, match="not both"):
        run_cli(str(RECIPES / "tiny" / "pretrain.yaml"), "--flavor", "nano-v2-9b",
                capsys=capsys)


# -- step time -----------------------------------------------------------------------------------

def test_step_estimate_pays_for_the_pipeline_bubble_and_recompute():
    cfg = get_flavor("nemotron-h-8b")
    peak = plan.GPUS["h100"].peak_flops("bf16")
    base = plan.TrainingLayout(seq_length=8192, tp=2, pp=2, num_microbatches=6)
    step = plan.step_estimate(cfg, base, peak)
    assert step.mfu == pytest.approx(plan.KERNEL_EFFICIENCY * 6 / 7)
    recomputed = plan.step_estimate(cfg, dataclasses.replace(base, recompute="full"), peak)
    assert recomputed.seconds > 1.25 * step.seconds and recomputed.mfu < step.mfu


# -- measured on the CPU -------------------------------------------------------------------------

def train_tiny_steps(cfg, layout: plan.TrainingLayout, steps: int = 2) -> None:
    """The recipe's model through the training engine (DDP, Adam, 1F1B schedule)."""
    import torch

    from megatron_hybrid import engine
    from megatron_hybrid.model import ModelLayout, build_model

    model = build_model(cfg, ModelLayout(recompute=layout.recompute), backend="cpu")
    chunks = [engine.wrap_ddp(model, use_distributed_optimizer=False)]
    optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings())
    shape = (layout.micro_batch_size, layout.seq_length)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, cfg.vocab_size, (shape[0], shape[1] + 1),
                                   generator=generator)
            yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                   "loss_mask": torch.ones(shape),
                   "position_ids": torch.arange(shape[1]).expand(shape)}

    data = batches()
    for _ in range(steps):
        engine.train_step(chunks, optimizer, data, num_microbatches=layout.num_microbatches,
                          micro_batch_size=layout.micro_batch_size, seq_length=layout.seq_length)


@pytest.fixture(scope="module")
def process_group():
    backends.install("cpu")
    from megatron_hybrid import parallel

    parallel.init_distributed(parallel.ParallelDims(), backend="cpu")
    yield
    parallel.destroy_distributed()


def test_predicted_peak_is_within_10_percent_of_the_measured_cpu_peak(process_group):
    from megatron_hybrid import parallel

    measured = {}
    for recompute in ("none", "full"):
        cfg = recipe.load_recipe(RECIPES / "tiny" / "pretrain.yaml",
                                 [f"train.recompute={recompute}"])
        layout = plan.TrainingLayout.from_run(cfg, world_size=1)
        assert (layout.seq_length, layout.micro_batch_size, layout.num_microbatches) == (256, 4, 2)
        parallel.seed_everything(0)
        _, measured[recompute] = plan.measure_cpu_peak(lambda: train_tiny_steps(cfg.model, layout))
        predicted = plan.training_memory(cfg.model, layout, kernels="cpu")
        assert predicted.total == pytest.approx(measured[recompute], rel=0.10), recompute
    # Activations dominate the first run and recompute removes most of them: both regimes of
    # the activation model are exercised.
    assert measured["full"] < 0.3 * measured["none"]
