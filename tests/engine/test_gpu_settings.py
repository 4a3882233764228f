"""The settings a run gets on GPUs, read from the real Megatron-Core config objects (built on
the CPU: TransformerConfig and the DDP/optimizer configs check nothing that needs CUDA, TE or
apex; the layers that use them would). Published FP8 recipes: docs/performance.md."""

from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends, launch
from megatron_hybrid.recipe import load_recipe

backends.install("cpu")

from megatron_hybrid import mcore  # noqa: E402  (after the backend)
from megatron_hybrid.engine import training_loop, training_step  # noqa: E402
from megatron_hybrid.model import build  # noqa: E402
from megatron_hybrid.parallel.process_groups import ParallelDims  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# recipe: (format, scaling, bf16 layers at start, at end, FP8 weight gather)
PUBLISHED_FP8 = {
    "nemotron_nano_v2/pretrain_12b.yaml": ("e4m3", "blockwise", 2, 2, True),
    "nemotron_h/pretrain_47b.yaml": ("hybrid", "tensorwise", 2, 2, True),
    "nemotron_h/pretrain_56b.yaml": ("hybrid", "tensorwise", 2, 2, True),
}


def configs(name: str, backend: str, *overrides: str):
    cfg = load_recipe(RECIPES / name, list(overrides))
    dims = ParallelDims(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp)
    model = build.transformer_config(cfg.model, training_loop.model_layout(cfg, dims),
                                     perform_initialization=False, backend=backend)
    ddp = training_step.ddp_config(
        model, use_distributed_optimizer=cfg.parallel.distributed_optimizer, backend=backend)
    optimizer = training_step.optimizer_config(training_loop.optimizer_settings(cfg), model)
    return model, ddp, optimizer


@pytest.mark.parametrize("name", sorted(PUBLISHED_FP8))
def test_published_pretraining_resolves_to_its_fp8_recipe(name):
    model, ddp, optimizer = configs(name, "cuda")
    fmt, scaling, start, end, gather = PUBLISHED_FP8[name]
    assert (model.fp8, model.fp8_recipe) == (fmt, scaling)
    assert model.first_last_layers_bf16
    assert (model.num_layers_at_start_in_bf16, model.num_layers_at_end_in_bf16) == (start, end)
    assert model.fp8_param == gather and ddp.fp8_param_gather == gather
    assert model.bf16 and model.params_dtype == torch.bfloat16
    # fp32 master weights, gradients and Adam states under FP8 (both papers)
    assert ddp.grad_reduce_in_fp32 and not optimizer.use_precision_aware_optimizer
    assert {optimizer.main_params_dtype, optimizer.main_grads_dtype, optimizer.exp_avg_dtype,
            optimizer.exp_avg_sq_dtype} == {torch.float32}


def test_bf16_recipe_has_no_fp8():
    model, ddp, _ = configs("nemotron_h/pretrain_8b.yaml", "cuda")
    assert model.fp8 is None and not model.fp8_param and not ddp.fp8_param_gather


def test_cuda_overlaps_and_fuses_cpu_keeps_its_settings(monkeypatch):
    monkeypatch.setattr(mcore, "gradient_accumulation_fusion_available", lambda: True)
    name = "nemotron_nano_v2/pretrain_12b.yaml"
    model, ddp, _ = configs(name, "cuda")
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.use_distributed_optimizer
    assert model.gradient_accumulation_fusion and model.cross_entropy_loss_fusion
    assert model.cross_entropy_fusion_impl == "native"
    assert model.bias_dropout_fusion and model.masked_softmax_fusion and model.persist_layer_norm
    assert not model.bias_activation_fusion  # squared ReLU, no bias: nothing to fuse
    assert not model.tp_comm_overlap  # opt-in
    assert configs(name, "cuda", "parallel.tp_comm_overlap=true")[0].tp_comm_overlap

    model, ddp, _ = configs("tiny/pretrain.yaml", "cpu")
    assert not (ddp.overlap_grad_reduce or ddp.overlap_param_gather)
    assert not any(getattr(model, field) for field in (
        "gradient_accumulation_fusion", "cross_entropy_loss_fusion", "bias_dropout_fusion",
        "masked_softmax_fusion", "persist_layer_norm", "bias_activation_fusion"))


def test_gradient_accumulation_fusion_needs_apex(monkeypatch):
    monkeypatch.setattr(mcore, "gradient_accumulation_fusion_available", lambda: False)
    model, _, _ = configs("nemotron_nano_v2/pretrain_12b.yaml", "cuda")
    assert not model.gradient_accumulation_fusion


def test_param_gather_overlaps_only_with_the_distributed_optimizer():
    _, ddp, _ = configs("nemotron_h/pretrain_8b.yaml", "cuda",
                        "parallel.distributed_optimizer=false")
    assert ddp.overlap_grad_reduce and not ddp.overlap_param_gather


def test_fp8_weights_need_the_distributed_optimizer():
    from megatron_hybrid.errors import ConfigError

    with pytest.raises(ConfigError, match="parallel.distributed_optimizer=true"):
        load_recipe(RECIPES / "nemotron_h/pretrain_56b.yaml",
                    ["parallel.distributed_optimizer=false"]).validate()


def test_fp8_needs_transformer_engine_layers():
    """Megatron-Core's local linears ignore config.fp8 (its fp8 context is a null context
    without Transformer Engine): such a run would train in bf16 and report FP8 MFU."""
    from megatron_hybrid.errors import ConfigError

    with pytest.raises(ConfigError, match="model.transformer_impl=local has none"):
        load_recipe(RECIPES / "nemotron_nano_v2/pretrain_12b.yaml",
                    ["model.transformer_impl=local"]).validate()
    load_recipe(RECIPES / "nemotron_nano_v2/pretrain_12b.yaml",
                ["model.transformer_impl=local", "train.precision=bf16"]).validate()


def test_launcher_environment_follows_tensor_and_context_parallelism():
    environment = launch.launcher_environment(load_recipe(RECIPES / "nemotron_h/pretrain_8b.yaml"))
    assert environment["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert environment["NCCL_IB_TIMEOUT"] == "19" and environment["NCCL_IB_RETRY_CNT"] == "7"
    single = launch.launcher_environment(load_recipe(RECIPES / "tiny/pretrain.yaml"))
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in single and "NCCL_IB_TIMEOUT" in single
    context = launch.launcher_environment(load_recipe(RECIPES / "tiny/pretrain.yaml",
                                                      ["parallel.cp=2"]))
    assert context["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_each_rank_gets_its_own_triton_and_inductor_caches():
    environ = {"RANK": "3", "TRITON_HOME": "home"}
    backends.separate_compile_caches(environ)
    assert environ["TRITON_CACHE_DIR"] == str(Path("home", ".triton", "cache", "rank3"))
    assert Path(environ["TORCHINDUCTOR_CACHE_DIR"]).name == "rank3"
    chosen = {"RANK": "3", "TRITON_CACHE_DIR": "mine", "TORCHINDUCTOR_CACHE_DIR": "ours"}
    backends.separate_compile_caches(chosen)
    assert (chosen["TRITON_CACHE_DIR"], chosen["TORCHINDUCTOR_CACHE_DIR"]) == ("mine", "ours")
    alone = {}
    backends.separate_compile_caches(alone)
    assert alone == {}  # one process, no RANK: the default caches


def test_dataset_build_waits_longer_than_the_collective_timeout(tmp_path):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(minutes=10))
    try:
        group = dist.distributed_c10d._get_default_group()
        timeout = lambda: group._get_backend(torch.device("cpu")).options._timeout  # noqa: E731
        with training_loop.collective_timeout(120, then=10):
            assert timeout() == datetime.timedelta(minutes=120)
        assert timeout() == datetime.timedelta(minutes=10)
    finally:
        dist.destroy_process_group()
