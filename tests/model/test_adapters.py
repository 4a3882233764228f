"""LoRA adapters: swapped in through the specs on every targeted linear (the MoE layer's routed
and shared experts included), the base frozen (no gradient, no optimizer state, the routers'
expert bias held), the trainable count equal to r * (in + out) per adapted linear, the merge
giving the same logits, and SFT steps changing the adapters only."""

import json
from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import LORA_TARGETS, ModelConfig, PeftConfig

backends.install("cpu")
from megatron_hybrid.model import adapters, params, specs  # noqa: E402
from megatron_hybrid.model import build  # noqa: E402
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402

MODEL = ModelConfig(pattern="M*-M-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
                    mamba_state_dim=8, mamba_num_groups=2, vocab_size=1024, seq_length=256,
                    mamba_chunk_size=64)
MOE_MODEL = MODEL.replace(pattern="M*E-ME", num_moe_experts=4, moe_router_topk=2,
                          moe_ffn_hidden_size=48, moe_shared_expert_intermediate_size=96,
                          moe_router_score_function="sigmoid",
                          moe_router_enable_expert_bias=True)
"""Nemotron 3's MoE in small: 4 routed experts (2 per token), a shared expert, a biased
sigmoid router; layers 2 and 5 are MoE, 3 a dense MLP."""
SFT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "sft.yaml"
LORA = PeftConfig(method="lora", rank=4, alpha=8.0)
KIND_MODULES = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1",
                "fc2": "linear_fc2", "in_proj": "in_proj", "out_proj": "out_proj"}


@pytest.fixture
def groups():
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    process_groups.seed_everything(0)
    yield
    process_groups.destroy_distributed()


def adapted(model) -> dict[str, torch.nn.Module]:
    return dict(adapters.lora_linears(model))


def logits(model, seed: int = 3):
    tokens = torch.randint(0, MODEL.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(seed))
    return model(tokens, torch.arange(24).expand_as(tokens), None).detach()


def randomize_b(model, where: str = "") -> None:
    """Non-zero B in every adapter whose name holds ``where`` (training would get there), so
    the adapters change the output."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, linear in adapters.lora_linears(model):
            if where in name:
                linear.lora_B.copy_(0.2 * torch.randn(linear.lora_B.shape, generator=generator))


@pytest.mark.parametrize("targets", [list(LORA_TARGETS), ["qkv", "in_proj"], ["fc2"]])
def test_trainable_parameters_are_the_adapters_and_match_the_formula(groups, targets):
    peft = PeftConfig(method="lora", rank=4, target_modules=targets)
    model = build_model(MODEL, ModelLayout(), backend="cpu", peft=peft)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(adapters.is_adapter_parameter(name) for name in trainable)
    assert sum(trainable.values()) == params.lora_parameter_count(MODEL, peft)
    kinds = {kind for kind, module in KIND_MODULES.items()
             if any(f".{module}." in name for name in trainable)}
    assert kinds == set(targets)
    # By hand for the tiny model: attention (qkv 32->64, proj 32->32), MLP x2 (32->64,
    # 64->32), Mamba x2 (in_proj 32->100: z, x 32 each, B, C 16 each, dt 4; out_proj
    # 32->32), r = 4.
    by_hand = {"qkv": 96, "proj": 64, "fc1": 2 * 96, "fc2": 2 * 96, "in_proj": 2 * 132,
               "out_proj": 2 * 64}
    assert params.lora_parameter_count(MODEL, peft) == 4 * sum(by_hand[k] for k in targets)


@pytest.mark.parametrize("targets", [["fc1", "fc2"], ["fc2"]])
def test_every_routed_and_shared_expert_is_adapted_and_counted(groups, targets):
    peft = PeftConfig(method="lora", rank=4, target_modules=targets)
    model = build_model(MOE_MODEL, ModelLayout(), backend="cpu", peft=peft)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(adapters.is_adapter_parameter(name) for name in trainable)
    assert sum(trainable.values()) == params.lora_parameter_count(MOE_MODEL, peft)
    experts = [f"experts.local_experts.{e}" for e in range(4)]
    for layer in (2, 5):
        for expert in (*experts, "shared_experts"):
            for kind in targets:
                module = model.get_submodule(f"decoder.layers.{layer}.mlp.{expert}.linear_{kind}")
                assert isinstance(module, adapters.LoraLinear), (layer, expert, kind)
        assert not model.decoder.layers[layer].mlp.router.weight.requires_grad
    # By hand, r = 4: per MoE layer 4 routed experts (fc1 32->48, fc2 48->32) and the shared
    # one (32->96, 96->32), 2 MoE layers; the dense MLP layer (32->64, 64->32).
    per_kind = 2 * (4 * 80 + 128) + 96
    assert params.lora_parameter_count(MOE_MODEL, peft) == 4 * per_kind * len(targets)


def test_without_peft_the_model_has_no_adapters_and_nothing_frozen(groups):
    model = build_model(MODEL, ModelLayout(), backend="cpu")
    assert not adapted(model) and all(p.requires_grad for p in model.parameters())
    assert params.lora_parameter_count(MODEL, PeftConfig()) == 0


@pytest.mark.parametrize("cfg", [MODEL, MOE_MODEL], ids=["dense", "moe"])
def test_adapters_start_at_zero_and_merge_into_the_same_logits(groups, cfg):
    model = build_model(cfg, ModelLayout(), backend="cpu", peft=LORA).eval()
    with adapters.adapters_disabled(model):
        base = logits(model)
    assert torch.equal(logits(model), base)  # B = 0: the adapted model starts as its base
    if cfg.num_moe_experts:  # control: the routed experts' adapters alone change the output
        randomize_b(model, ".local_experts.")
        assert (logits(model) - base).abs().max() > 0.1
    randomize_b(model)
    unmerged = logits(model)
    assert (unmerged - base).abs().max() > 0.1  # control: the adapters change the output
    adapters.merge_adapters(model)
    merged = logits(model)
    assert (merged - unmerged).abs().max() < 1e-5
    with adapters.adapters_disabled(model):  # merged weights hold the whole function
        assert (logits(model) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("cfg", [MODEL, MOE_MODEL], ids=["dense", "moe"])
def test_optimizer_steps_change_the_adapters_only(groups, cfg):
    from megatron_hybrid.data import chat
    from megatron_hybrid.data.datasets import microbatch_iterator
    from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.stages import task

    model = build_model(cfg, ModelLayout(), backend="cpu", peft=LORA)
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")]
    optimizer = training_step.build_optimizer(
        chunks, training_step.OptimizerSettings(lr=1e-2, weight_decay=0.0))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in model.named_parameters()
                         if adapters.is_adapter_parameter(name)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # The routers' expert bias, a buffer that load balancing moves without LoRA (test_moe).
    biases = {name: b.clone() for name, b in model.named_buffers() if name.endswith("expert_bias")}
    assert len(biases) == cfg.layer_pattern.counts.get("E", 0)
    sequences = chat.pack_conversations(task.conversations("train")[:64],
                                        load_tokenizer(TokenizerConfig()), seq_length=256)
    data = microbatch_iterator(chat.ChatDataset(sequences, num_samples=24, seed=0),
                               start_sample=0, micro_batch_size=4, num_microbatches=2,
                               dp_rank=0, dp_size=1)
    losses = [training_step.train_step(chunks, optimizer, data, num_microbatches=2,
                                       micro_batch_size=4, seq_length=256).loss
              for _ in range(3)]
    # Every adapter trains, each routed expert's included.
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if adapters.is_adapter_parameter(name)}
    assert all(torch.equal(model.get_buffer(name), bias) for name, bias in biases.items())
    assert losses[-1] < losses[0], losses
    assert all(p.grad is None and getattr(p, "main_grad", None) is None
               for name, p in model.named_parameters() if not adapters.is_adapter_parameter(name))


def test_in_proj_adapter_is_saved_in_the_pieces_of_its_weight(groups):
    model = build_model(MODEL, ModelLayout(), backend="cpu", peft=LORA)
    factory = model.sharded_state_dict()["decoder.layers.0.mixer.in_proj.lora_B"]
    assert [piece.key for piece in factory.build()] == [
        f"decoder.layers.0.mixer.in_proj.lora_B.{part}" for part in ("z", "x", "B", "C", "dt")]


def test_expert_adapters_are_saved_by_global_expert_and_reload(groups, tmp_path):
    """Megatron-Core saves a SequentialMLP's experts as one tensor per weight, indexed by the
    global expert (``...mlp.experts.experts.linear_fc1.weight`` [experts, out, in]): the
    adapters follow, so they reload per expert, at any expert-parallel split."""
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint

    model = build_model(MOE_MODEL, ModelLayout(), backend="cpu", peft=LORA)
    randomize_b(model)
    saved = tmp_path / "step_000001"
    dist_checkpoint.save_weights([model], saved)
    shapes = {key: tuple(meta.global_shape) for key, meta in
              mcore.dist_checkpointing.load_tensors_metadata(str(saved)).items()}
    experts = "decoder.layers.2.mlp.experts.experts"
    assert shapes[f"{experts}.linear_fc1.lora_A"] == (4, 4, 32)
    assert shapes[f"{experts}.linear_fc1.lora_B"] == (4, 48, 4)
    assert shapes[f"{experts}.linear_fc2.lora_A"] == (4, 4, 48)
    assert shapes["decoder.layers.5.mlp.shared_experts.linear_fc2.lora_B"] == (32, 4)
    process_groups.seed_everything(1)  # other initial adapters, A included
    fresh = build_model(MOE_MODEL, ModelLayout(), backend="cpu", peft=LORA)
    dist_checkpoint.load_weights([fresh], saved)
    trained = dict(model.named_parameters())
    loaded = [(name, p) for name, p in fresh.named_parameters() if ".local_experts." in name]
    assert len(loaded) == 2 * 4 * 6  # 2 MoE layers, 4 experts, fc1 and fc2: W, A, B
    assert all(torch.equal(p, trained[name]) for name, p in fresh.named_parameters())


def test_peft_export_of_an_moe_model_is_refused_in_one_line(tmp_path):
    """HF NemotronH fuses its routed experts into [experts, out, in] tensors, which peft's
    LoRA modules cannot adapt (the merged model exports instead)."""
    from megatron_hybrid.checkpoint import dist_checkpoint, peft_adapter
    from megatron_hybrid.model.hf_mapping import ConversionError

    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / dist_checkpoint.META).write_text(json.dumps(
        {"model": MOE_MODEL.to_dict(), "peft": LORA.to_dict()}))
    with pytest.raises(ConversionError,
                       match="is of an MoE model .* export them merged") as error:
        peft_adapter.export_lora(tmp_path, tmp_path / "adapter")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"rank": 0}, "peft.rank must be a positive integer, got 0"),
    ({"dropout": 1.0}, r"peft.dropout must be in \[0, 1\), got 1.0"),
    ({"target_modules": ["q_proj"]}, r"peft.target_modules: unknown kinds \['q_proj'\]"),
    ({"method": "lorra"}, "peft.method='lorra': did you mean 'lora'"),
])
def test_bad_peft_sections_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        PeftConfig(**{"method": "lora", **changes}).validate()
    assert "\n" not in str(error.value)


def test_lora_on_the_transformer_engine_spec_and_under_full_recompute_is_refused():
    with pytest.raises(ConfigError, match="set model.transformer_impl=local"):
        specs.stack_spec("cuda", [3], build.mixer_params(MODEL), peft=LORA)
    from megatron_hybrid import recipe

    with pytest.raises(ConfigError, match="train.recompute=full cannot recompute"):
        recipe.load_recipe(SFT_RECIPE, ["peft.method=lora", "train.recompute=full"]).validate()


def sft_lora_run(model: ModelConfig, out: Path, *, steps: int):
    """(config, report) of an SFT stage run of ``model`` with rank-4 adapters
    (recipes/tiny/sft_lora.yaml) into ``out``."""
    from megatron_hybrid import recipe
    from megatron_hybrid.engine import training_loop
    from megatron_hybrid.stages import sft

    cfg = recipe.load_recipe(SFT_RECIPE.with_name("sft_lora.yaml"), [
        *(f"model.{k}={v}" for k, v in model.to_dict().items() if v is not None),
        "checkpoint.load=null", f"output_dir={out}", f"train.max_steps={steps}",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_batches=1",
        "scheduler.warmup_steps=1", "logging.progress_bar=off", "logging.tensorboard=false",
        "logging.plot=false", "peft.rank=4"])
    with training_loop.session(cfg) as (backend, dims):
        return cfg, sft.finetune(cfg, sft.SFTConfig(task_samples=0), backend, dims)


def test_sft_stage_with_lora_saves_the_adapters_with_the_model(tmp_path):
    from megatron_hybrid.checkpoint import dist_checkpoint

    out = tmp_path / "sft-lora"
    cfg, report = sft_lora_run(MODEL, out, steps=2)
    assert report["end"]["heldout_loss"]["all"] < report["start"]["heldout_loss"]["all"]
    saved = out / "checkpoints" / "step_000002"
    assert dist_checkpoint.read_meta(saved)["peft"] == {**cfg.peft.to_dict(), "rank": 4}
    keys = json.dumps(sorted(dist_checkpoint._saved_keys(saved)))
    assert "decoder.layers.1.self_attention.linear_qkv.lora_A" in keys
    assert "decoder.layers.0.mixer.in_proj.lora_B.dt" in keys
    # The inference loader builds the adapters the checkpoint names and loads them trained.
    from megatron_hybrid.inference.loading import loaded_model

    with loaded_model(saved, backend="cpu") as (model, _, _):
        trained = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert trained and any(p.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("peft", [None, LORA], ids=["full", "lora"])
def test_gradient_and_optimizer_bytes_are_what_the_planner_counts(groups, peft):
    """Megatron-Core's DDP gradient buffers and Adam state, after a step, hold exactly the
    planner's bytes (fp32): the whole model's for full training, the adapters' alone with
    LoRA (3.75% of them for this model at r=4)."""
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.planning import planner

    model = build_model(MODEL, ModelLayout(), backend="cpu", peft=peft)
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")]
    optimizer = training_step.build_optimizer(chunks, training_step.OptimizerSettings(lr=1e-2))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.main_grad.normal_()
    optimizer.step()
    gradients = sum(buffer.grad_data.nbytes for buffer in chunks[0].buffers)
    adam = sum(value.nbytes for inner in getattr(optimizer, "chained_optimizers", [optimizer])
               for state in inner.optimizer.state.values() for value in state.values()
               if torch.is_tensor(value) and value.dim() > 0)  # not the step counter
    planned = planner.training_memory(MODEL, planner.TrainingLayout(
        seq_length=MODEL.seq_length, precision="fp32", peft=peft))
    trainable = params.lora_parameter_count(MODEL, LORA) if peft else sum(
        p.numel() for p in model.parameters())
    assert (gradients, adam) == (planned.gradients, planned.optimizer) == (4 * trainable,
                                                                          8 * trainable)
    assert planned.parameters == 4 * sum(p.numel() for p in model.parameters())
