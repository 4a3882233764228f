"""Mixture of experts (`E` layers) on the cpu backend.

Megatron-Core 0.16.1's router reaches a Transformer Engine GEMM that only exists with TE
(``transformer/moe/moe_utils.py:1192``); the cpu backend stands in for it, so an `E` pattern
trains through the command a user types and its loss falls. The router runs as Nemotron 3
Nano's (HF NemotronH's ``NemotronHTopkRouter``): sigmoid scores, an expert bias that moves the
choice only, the chosen scores normalized and scaled, and a shared expert.
"""

import pytest
import torch
from test_train import step_losses, train

from megatron_hybrid import backends

backends.install("cpu")

from megatron_hybrid.errors import ConfigError  # noqa: E402
from megatron_hybrid.model import build  # noqa: E402
from megatron_hybrid.model.flavors import get_flavor  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402

MOE_MODEL = ["model.flavor=tiny-hybrid", "model.pattern=M*E-ME", "model.num_moe_experts=4",
             "model.moe_router_topk=2", "tokenizer.vocab_size=512"]


def test_the_router_gating_gemm_runs_without_transformer_engine():
    from megatron_hybrid.mcore import moe_utils_module

    assert not moe_utils_module.HAVE_TE  # the cpu backend's machines have no TE
    assert moe_utils_module.te_general_gemm is None  # unbound (NameError) without the stand-in


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    result = train(out, *MOE_MODEL, "train.max_steps=8")
    return out, result


def test_an_e_pattern_trains_and_its_loss_falls(moe_run):
    out, _ = moe_run
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 9))
    # Measured drop losses[1] - losses[8] (1 thread): 0.39.
    assert losses[8] < losses[1] - 0.2, losses


NEMOTRON_ROUTER = dict(
    pattern="M*E-ME", num_moe_experts=8, moe_router_topk=3, moe_ffn_hidden_size=48,
    moe_shared_expert_intermediate_size=96, moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
    moe_router_dtype="fp64")


@pytest.fixture
def nemotron_router_model():
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    process_groups.seed_everything(0)
    cfg = get_flavor("tiny-hybrid").replace(**NEMOTRON_ROUTER)
    yield cfg, build.build_model(cfg, build.ModelLayout(), backend="cpu")
    process_groups.destroy_distributed()


def test_the_router_weights_tokens_as_nemotron_3_does(nemotron_router_model):
    cfg, model = nemotron_router_model
    moe = model.decoder.layers[2].mlp
    assert moe.shared_experts.linear_fc1.weight.shape == (96, cfg.hidden_size)
    router = moe.router
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0], dtype=torch.float32)
    router.expert_bias.copy_(bias)  # expert 7 is always chosen, its weight is unbiased
    hidden = torch.randn(5, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs, routing_map = router(hidden)
    # HF NemotronHTopkRouter, written out: choose on sigmoid + bias, weigh by the sigmoid.
    scores = torch.sigmoid(hidden.reshape(5, -1).double() @ router.weight.double().t())
    chosen = torch.topk(scores + bias.double(), 3, dim=-1).indices
    weights = scores.gather(1, chosen)
    weights = weights / weights.sum(-1, keepdim=True) * 2.5
    expected = torch.zeros_like(scores).scatter(1, chosen, weights)
    assert routing_map.all(0)[7] and routing_map.sum(-1).tolist() == [3] * 5
    torch.testing.assert_close(probs.double(), expected)


def test_a_training_step_moves_the_expert_bias_towards_idle_experts(nemotron_router_model):
    from megatron_hybrid import mcore
    from megatron_hybrid.engine import training_step

    _, model = nemotron_router_model
    ddp = training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")
    router = model.decoder.layers[2].mlp.router
    tokens = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(1))
    ddp(tokens, None, None, labels=tokens).sum().backward()
    load = router.local_tokens_per_expert.clone()
    assert load.sum() == 64 * 3
    mcore.finalize_model_grads([ddp])
    moved = router.expert_bias
    # Megatron-Core's update: bias += rate * sign(mean load - load).
    assert torch.equal(moved, 1e-3 * torch.sign(load.mean() - load))


@pytest.mark.parametrize("change, message", [
    (dict(moe_router_enable_expert_bias=True), "needs model.moe_router_score_function=sigmoid"),
    (dict(moe_router_topk=9), "moe_router_topk \\(9\\) must be between 1 and"),
    (dict(moe_router_score_function="sigmod"), "did you mean 'sigmoid'"),
    (dict(moe_router_topk_scaling_factor=0.0), "moe_router_topk_scaling_factor must be > 0"),
])
def test_router_settings_that_cannot_build_are_refused_in_one_line(change, message):
    cfg = get_flavor("tiny-hybrid").replace(pattern="M*E-ME", num_moe_experts=8, **change)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
