"""The published recipes hold the published numbers (../shared/REFERENCE.md, written out here),
validate on 8-GPU nodes, and chain into the published pipeline; the tiny pipeline mirrors it."""

import dataclasses
from pathlib import Path

import pytest

from megatron_hybrid.model import flavors
from megatron_hybrid.pipeline import runner
from megatron_hybrid.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NODE_GPUS = 8

SHAPES = {
    # flavor: layers, hidden, FFN, attention heads / KV groups / head dim, Mamba heads x head
    # dim, state, groups (REFERENCE.md "Model shapes"; vocab 131072 for all)
    "nemotron-h-4b": (52, 3072, 12288, 32, 8, 128, 112, 64, 128, 8),
    "nemotron-h-8b": (52, 4096, 21504, 32, 8, 128, 128, 64, 128, 8),
    "nemotron-h-47b": (98, 8192, 30720, 64, 8, 128, 256, 64, 256, 8),
    "nemotron-h-56b": (118, 8192, 32768, 64, 8, 128, 256, 64, 256, 8),
    "nano-v2-12b": (62, 5120, 20480, 40, 8, 128, 128, 80, 128, 8),
    "nano-v2-9b": (56, 4480, 15680, 40, 8, 128, 128, 80, 128, 8),
    "nemotron-3-nano": (52, 2688, 1856, 32, 2, 128, 64, 64, 128, 8),
}
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "mamba_num_heads", "mamba_head_dim",
              "mamba_state_dim", "mamba_num_groups")
PATTERNS = {
    "nemotron-h-4b": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "nemotron-h-8b": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "nemotron-h-47b": "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
                      "M-M---MM---M-M*-M-M-M-M-M-",
    "nemotron-h-56b": "M-M-M-M*-M-M-M-M-M*" + "-M-M-M-M-M*" * 8 + "-M-M-M-M-M-",
    "nano-v2-12b": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "nano-v2-9b": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
    "nemotron-3-nano": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
}

# recipe: (model shape, tp, precision, sequence length); REFERENCE.md: 12B pretraining in FP8
# at 8192; public recipes use TP=4 (12B) / TP=2 (9B) with sequence parallel; Nemotron-H
# layouts as NVIDIA's public Megatron-Bridge recipes (TP=2 for 8B, TP=8 and FP8 for 47B/56B).
# The 9B distillation holds the 12B teacher too, so it keeps the teacher's TP=4; pruning runs
# at TP=1 (ModelOpt).
LAYOUTS = {
    "nemotron_nano_v2/pretrain_12b.yaml": ("nano-v2-12b", 4, "fp8-nano-v2", 8192),
    "nemotron_nano_v2/sft.yaml": ("nano-v2-12b", 4, "bf16", 8192),
    "nemotron_nano_v2/sft_lora.yaml": ("nano-v2-12b", 4, "bf16", 8192),
    "nemotron_nano_v2/dpo.yaml": ("nano-v2-12b", 4, "bf16", 8192),
    "nemotron_nano_v2/prune_12b_to_9b.yaml": ("nano-v2-12b", 1, "bf16", 8192),
    "nemotron_nano_v2/distill_9b.yaml": ("nano-v2-9b", 4, "bf16", 8192),
    "nemotron_h/pretrain_8b.yaml": ("nemotron-h-8b", 2, "bf16", 8192),
    "nemotron_h/pretrain_47b.yaml": ("nemotron-h-47b", 8, "fp8-nemotron-h", 8192),
    "nemotron_h/pretrain_56b.yaml": ("nemotron-h-56b", 8, "fp8-nemotron-h", 8192),
    # Nemotron-H's compressions (tests/stages/test_compression_recipes.py): pruning at TP=1
    # (the 56B at PP=2), distillation at the teacher's pretraining TP.
    "nemotron_h/prune_8b_to_4b.yaml": ("nemotron-h-8b", 1, "bf16", 8192),
    "nemotron_h/distill_4b.yaml": ("nemotron-h-4b", 2, "bf16", 8192),
    "nemotron_h/prune_56b_to_47b.yaml": ("nemotron-h-56b", 1, "bf16", 8192),
    "nemotron_h/distill_47b.yaml": ("nemotron-h-47b", 8, "bf16", 8192),
    # Nemotron 3 Nano as Megatron-Bridge publishes it (EP=8, expert TP 1): SFT at TP=1;
    # pretraining at TP=4, twice its 2 KV groups.
    "nemotron_3_nano/pretrain.yaml": ("nemotron-3-nano", 4, "bf16", 8192),
    "nemotron_3_nano/sft.yaml": ("nemotron-3-nano", 1, "bf16", 2048),
}
STAGE_GRAPH = [  # the published 12B -> 9B pipeline, by stage name, in the paper's order
    ("pretrain", "train", {}),
    ("long_context", "train", {"checkpoint.load": "pretrain"}),  # extends the base
    ("sft", "sft", {"checkpoint.load": "long_context"}),
    ("dpo", "dpo", {"checkpoint.load": "sft"}),
    ("prune", "prune", {"checkpoint.load": "dpo"}),
    ("distill", "distill", {"checkpoint.load": "prune", "distill.teacher": "dpo"}),
]


def recipe(name: str):
    return load_recipe(RECIPES / name)


def test_every_published_file_is_checked_here():
    published = {str(p.relative_to(RECIPES))
                 for folder in ("nemotron_nano_v2", "nemotron_h", "nemotron_3_nano")
                 for p in (RECIPES / folder).glob("*.yaml")}
    checked = {*LAYOUTS, "nemotron_nano_v2/pipeline.yaml",
               "nemotron_nano_v2/long_context_128k.yaml"}
    assert published <= checked, f"add these to the tests: {sorted(published - checked)}"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_model_shape_and_layout_for_8_gpu_nodes(name):
    shape, tp, precision, seq_length = LAYOUTS[name]
    cfg = recipe(name)
    model = cfg.model
    assert tuple(getattr(model, key) for key in SHAPE_KEYS) == SHAPES[shape]
    assert model.pattern == PATTERNS[shape] and model.vocab_size == 131072
    assert (model.norm_eps, model.mamba_chunk_size) == (1e-5, 128)
    assert cfg.parallel.tp == tp and cfg.parallel.sequence_parallel == (tp > 1)
    assert (cfg.train.precision, cfg.seq_length) == (precision, seq_length)
    assert cfg.parallel.backend == "cuda"
    cfg.validate(world_size=NODE_GPUS)  # one node; more nodes add data parallel
    cfg.validate_for_backend("cuda")


def test_12b_pretraining_holds_the_published_recipe():
    cfg = recipe("nemotron_nano_v2/pretrain_12b.yaml")
    assert cfg.train.global_batch_size == 768 and cfg.seq_length == 8192
    assert cfg.train.precision == "fp8-nano-v2"
    assert cfg.train.max_tokens == 20 * 10**12
    tokens = cfg.total_steps * cfg.train.tokens_per_step(cfg.model)
    assert 0 <= tokens - 20 * 10**12 < cfg.train.tokens_per_step(cfg.model)  # max_tokens ends it
    assert cfg.scheduler.kind == "wsd"
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (4.5e-4, 4.5e-6)
    assert cfg.parallel.distributed_optimizer
    assert len(cfg.data.blend) >= 2 and all(isinstance(p, str) for p in cfg.data.blend)


@pytest.mark.parametrize("size", ["8b", "47b", "56b"])
def test_nemotron_h_pretraining_batch_and_sequence(size):
    cfg = recipe(f"nemotron_h/pretrain_{size}.yaml")
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.seq_length) == (
        768, 1, 8192)


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_nemotron_3_nano_holds_the_published_moe_recipe(stage):
    from megatron_hybrid.planning import planner

    cfg = recipe(f"nemotron_3_nano/{stage}.yaml")
    model = cfg.model
    assert (model.num_moe_experts, model.moe_router_topk, model.moe_ffn_hidden_size,
            model.moe_shared_expert_intermediate_size) == (128, 6, 1856, 3712)
    assert (cfg.parallel.ep, cfg.parallel.expert_tp, cfg.parallel.moe_dispatcher) == (
        8, 1, "alltoall")
    assert cfg.parallel.distributed_optimizer
    published = {"pretrain": (3072, 2, 39735, 1.6e-3, 1.6e-5, 333),
                 "sft": (128, 1, 1000, 5e-6, 0.0, 50)}[stage]
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.max_steps,
            cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.scheduler.warmup_steps) == published
    assert cfg.scheduler.kind == "cosine"
    # The plan shards the routed experts by EP: at EP=8 each GPU holds 1/8 of EP=1's.
    layout = planner.TrainingLayout.from_run(cfg, NODE_GPUS)
    plans = {ep: planner.training_memory(model, dataclasses.replace(layout, ep=ep))
             for ep in (1, 8)}
    assert plans[8].experts["parameters"] == pytest.approx(plans[1].experts["parameters"] / 8)
    assert plans[8].experts["parameters"] > 6 * 2**30  # 16 of 128 experts x 23 layers, bf16


def test_12b_lora_is_the_sft_recipe_with_adapters_and_a_fraction_of_its_state():
    from megatron_hybrid.planning import planner

    full, lora = recipe("nemotron_nano_v2/sft.yaml"), recipe("nemotron_nano_v2/sft_lora.yaml")
    assert lora.peft.enabled and not full.peft.enabled and lora.peft.rank == 16
    assert "out_proj" not in lora.peft.target_modules  # peft refuses it on HF NemotronH
    assert lora.model.transformer_impl == "local"  # the adapters replace Megatron-Core's linears
    assert (lora.train, lora.sft, lora.parallel) == (full.train, full.sft, full.parallel)
    plans = [planner.training_memory(cfg.model, planner.TrainingLayout.from_run(cfg, NODE_GPUS))
             for cfg in (full, lora)]
    trainable = [plan.gradients + plan.optimizer for plan in plans]
    # Measured: 28.7 GiB -> 0.14 GiB per GPU (0.3% of the parameters train); 49.0 -> 20.2 in all.
    assert trainable[1] < trainable[0] / 100 and plans[1].total < plans[0].total / 2


def test_prune_and_distill_hold_the_12b_to_9b_numbers():
    prune = recipe("nemotron_nano_v2/prune_12b_to_9b.yaml")
    assert prune.prune.export_config == {"hidden_size": 4480, "ffn_hidden_size": 15680,
                                         "num_layers": 56}
    big, small = (flavors.get_flavor(name).layer_pattern.counts
                  for name in ("nano-v2-12b", "nano-v2-9b"))
    assert {kind: big[kind] - small[kind] for kind in "*M-"} == {"*": 2, "M": 1, "-": 3}
    assert (prune.parallel.tp, prune.parallel.cp) == (1, 1)
    distill = recipe("nemotron_nano_v2/distill_9b.yaml")
    assert distill.distill.logits_temperature == 1.0
    assert 80 * 10**9 <= distill.train.max_tokens <= 100 * 10**9


def test_long_context_extends_to_128k_with_context_parallel():
    cfg = recipe("nemotron_nano_v2/long_context_128k.yaml")
    assert cfg.seq_length == 131072 and cfg.parallel.cp > 1
    assert tuple(getattr(cfg.model, key) for key in SHAPE_KEYS) == SHAPES["nano-v2-12b"]
    cfg.validate(world_size=NODE_GPUS)


def graph(path: Path) -> list:
    return [(stage.name, stage.kind, stage.inputs)
            for stage in runner.load_pipeline(path).stages]


def test_published_pipeline_chains_the_stages_and_plans_8_gpu_nodes(tmp_path):
    path = RECIPES / "nemotron_nano_v2" / "pipeline.yaml"
    assert graph(path) == STAGE_GRAPH
    loaded = runner.load_pipeline(path, output_dir=str(tmp_path / "out"))
    plans = [runner.plan_stage(loaded, stage, selected=True) for stage in loaded.stages]
    assert [plan.nproc for plan in plans] == [NODE_GPUS, NODE_GPUS, NODE_GPUS, NODE_GPUS, 1,
                                              NODE_GPUS]
    assert all(plan.cfg.parallel.backend == "cuda" for plan in plans)
    text = runner.describe_plan(loaded, plans)
    pretrain = text.split("\n2. ")[0]
    assert "tp 4 x pp 1 x cp 1 x dp 2 = world size 8, sequence parallel on" in pretrain
    assert "20T tokens, fp8-nano-v2" in pretrain
    assert "per GPU, fits an NVIDIA H100" in pretrain and "at MFU ~47%" in pretrain
    assert not (tmp_path / "out").exists()


def test_tiny_pipeline_mirrors_the_published_one():
    # with GRPO after DPO (on the tiny task's verifiable rewards), whose model is pruned and
    # teaches; and it ends by quantizing the distilled student, as NVIDIA releases FP8 / NVFP4
    # models
    *stages, quantize = graph(RECIPES / "tiny" / "pipeline.yaml")
    rl = stages.pop([name for name, *_ in stages].index("grpo"))
    assert rl == ("grpo", "grpo", {"checkpoint.load": "dpo"})
    without_rl = [(name, kind, {key: "dpo" if source == "grpo" else source
                                for key, source in inputs.items()})
                  for name, kind, inputs in stages]
    assert without_rl == STAGE_GRAPH
    inputs = {name: inputs for name, _, inputs in stages}
    assert inputs["prune"]["checkpoint.load"] == inputs["distill"]["distill.teacher"] == "grpo"
    assert quantize == ("quantize", "quantize", {"checkpoint.load": "distill"})
