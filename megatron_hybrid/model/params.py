"""Parameter counts from the real models, built on the meta device (no weight memory).

:func:`count_parameters` builds this project's Megatron-Core ``MambaModel`` (TP=1, PP=1) with
its weights on ``meta`` (:func:`build_on_meta`), so even the 56B builds in well under a second
and without allocating weights, on either backend. :func:`hf_parameter_counts` builds HF's
``NemotronHForCausalLM`` for the same config on ``meta``: the independent count (total and
active) the published flavors are checked against.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_hybrid.model.config import LORA_COLUMN_TARGETS, ModelConfig, PeftConfig

KIND_KEYS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe", "H": "parallel_heads"}
"""Pattern symbol -> the key of its per-kind sum in :func:`count_parameters`."""


def count_parameters(cfg: ModelConfig) -> dict:
    """Parameters of the Megatron-Core model of ``cfg`` (TP=1, PP=1, untied output layer).

    Returns ``total``, ``embedding``, ``output_layer``, ``final_norm``, ``meta_tokens``, one
    sum per layer kind (``mamba``, ``attention``, ``mlp``, ``moe``, ``parallel_heads``; zero
    when absent), ``per_layer`` (a list
    in pattern order, as ``pattern.describe(params_per_layer=...)`` takes), and what one token
    uses: ``active`` (all but the routed experts it is not sent to: ``num_moe_experts -
    moe_router_topk`` per MoE layer) and ``active_without_embedding`` (without the input
    embedding table, a lookup; the output layer stays, every token multiplies by it: the
    convention of Nemotron 3 Nano's published 3.2B active), with ``total_without_embedding``.

    Runs on the installed backend (the cpu backend is installed here if none is: counting
    is CPU work) in a TP=1/PP=1 model-parallel state (a 1-process group is started here, and
    torn down again, when none exists). The caller's RNG states are left as they were.
    """
    with single_process_model_parallel():
        model = build_on_meta(cfg)
        try:
            return _tally(model, cfg)
        finally:
            del model


def lora_linear_shapes(cfg: ModelConfig) -> list[tuple[str, str, int, int, int]]:
    """(LoRA target kind, the layer symbol holding it, in features, out features, copies in
    one such layer) of every linear LoRA can adapt, TP=1. An ``E`` layer holds fc1 and fc2
    once per routed expert (width ``moe_ffn_hidden_size``) and once in its shared expert,
    when it has one."""
    h = cfg.hidden_size
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    in_proj_out = (2 * cfg.mamba_d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
                   + cfg.mamba_num_heads)
    shapes = [("qkv", "*", h, qkv_out, 1),
              ("proj", "*", cfg.num_attention_heads * cfg.kv_channels, h, 1),
              ("fc1", "-", h, cfg.ffn_hidden_size, 1), ("fc2", "-", cfg.ffn_hidden_size, h, 1),
              ("in_proj", "M", h, in_proj_out, 1), ("out_proj", "M", cfg.mamba_d_inner, h, 1)]
    if cfg.num_moe_experts:
        experts = [(cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size, cfg.num_moe_experts)]
        if cfg.moe_shared_expert_intermediate_size:
            experts.append((cfg.moe_shared_expert_intermediate_size, 1))
        for width, copies in experts:
            shapes += [("fc1", "E", h, width, copies), ("fc2", "E", width, h, copies)]
    return shapes


def lora_layer_parameters(cfg: ModelConfig, peft: PeftConfig, tp: int = 1) -> dict[str, int]:
    """Layer symbol -> the adapter parameters one layer of that kind holds on one of ``tp``
    ranks: r * (in + out) per adapted linear (A is [r, in], B [out, r]), a column-parallel
    base's B split by rows, a row-parallel base's A by columns, the other factor whole. The
    routed experts count as split over expert TP = ``tp``, all of them on every rank (EP = 1)."""
    per_layer: dict[str, int] = {}
    if not peft.enabled:
        return per_layer
    for kind, symbol, fan_in, fan_out, copies in lora_linear_shapes(cfg):
        if kind in peft.target_modules:
            if kind in LORA_COLUMN_TARGETS:
                fan_out //= tp
            else:
                fan_in //= tp
            per_layer[symbol] = per_layer.get(symbol, 0) + copies * peft.rank * (fan_in + fan_out)
    return per_layer


def lora_parameter_count(cfg: ModelConfig, peft: PeftConfig) -> int:
    """Trainable parameters of ``peft``'s adapters on ``cfg`` (TP=1)."""
    counts = cfg.layer_pattern.counts
    return sum(counts.get(symbol, 0) * parameters
               for symbol, parameters in lora_layer_parameters(cfg, peft).items())


def hf_parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """``total`` and ``active`` parameters of HF ``NemotronHForCausalLM`` for ``cfg``, built
    on the meta device; ``active`` leaves out, in each MoE block, the routed experts' share
    (HF's ``experts.up_proj`` / ``down_proj``, one slice per expert) a token does not use."""
    from transformers import NemotronHForCausalLM

    from megatron_hybrid.model.hf_mapping import hf_config_from_model

    with torch.device("meta"):
        model = NemotronHForCausalLM(hf_config_from_model(cfg))
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for name, module in model.named_modules():
        if name.endswith(".mixer.experts"):
            experts = module.up_proj.shape[0]
            per_expert = (module.up_proj.numel() + module.down_proj.numel()) // experts
            idle += per_expert * (experts - cfg.moe_router_topk)
    return {"total": total, "active": total - idle}


def _tally(model: torch.nn.Module, cfg: ModelConfig) -> dict:
    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    layers = cfg.layer_pattern.layers
    per_layer = [numel(layer) for layer in model.decoder.layers]
    counts = {
        "total": numel(model),
        "embedding": numel(getattr(model, "embedding", None)),
        "output_layer": numel(getattr(model, "output_layer", None)),
        "final_norm": numel(getattr(model.decoder, "final_norm", None)),
        "meta_tokens": numel(getattr(model.decoder, "meta_tokens", None)),
        **{key: sum(n for n, s in zip(per_layer, layers) if s == symbol)
           for symbol, key in KIND_KEYS.items()},
        "per_layer": per_layer,
    }
    parts = ("embedding", "output_layer", "final_norm", "meta_tokens", *KIND_KEYS.values())
    if sum(counts[key] for key in parts) != counts["total"]:
        raise AssertionError(f"parameter parts do not add up to the total: {counts}")
    idle_experts = (cfg.num_moe_experts or 0) - cfg.moe_router_topk
    idle = sum(numel(layer.mlp.experts) // cfg.num_moe_experts * idle_experts
               for layer, symbol in zip(model.decoder.layers, layers) if symbol == "E")
    counts["active"] = counts["total"] - idle
    counts["total_without_embedding"] = counts["total"] - counts["embedding"]
    counts["active_without_embedding"] = counts["active"] - counts["embedding"]
    return counts


def build_on_meta(cfg: ModelConfig, peft: PeftConfig | None = None):
    """``cfg``'s whole model (with ``peft``'s adapters), its weights on ``meta``. On the cpu backend Megatron-Core's
    explicit CUDA devices are redirected to ``meta`` too. On cuda the local spec with
    Megatron-Core's CPU initialisation puts every weight on torch's default device (``meta``)
    except the Mamba mixers' per-head tensors (conv, dt bias, A, D: a few MiB), which
    Megatron-Core places on the GPU itself."""
    from megatron_hybrid import backends
    from megatron_hybrid.model.build import ModelLayout, build_model

    backend = backends.require_active()
    with _rng_tracker_seeded(), torch.device("meta"):
        if backend == "cpu":
            from megatron_hybrid.backends.cpu import cuda_device_is

            with cuda_device_is("meta"):
                return build_model(cfg, ModelLayout(), backend="cpu",
                                   perform_initialization=False, peft=peft)
        return build_model(cfg.replace(transformer_impl="local"), ModelLayout(), backend=backend,
                           perform_initialization=False, use_cpu_initialization=True,
                           peft=peft)


@contextlib.contextmanager
def single_process_model_parallel():
    """A model-parallel state to build a whole model in: this process's (TP=PP=1), or a
    1-process group on the installed backend (the cpu backend if none is) started here and
    torn down after."""
    from megatron_hybrid import backends

    backend = backends.active() or backends.install("cpu")
    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import process_groups

    state = mcore.parallel_state
    if state.model_parallel_is_initialized():
        sizes = (state.get_tensor_model_parallel_world_size(),
                 state.get_pipeline_model_parallel_world_size())
        if sizes != (1, 1):
            raise RuntimeError(f"count_parameters needs TP=1, PP=1 (the whole model on one "
                               f"rank); this process has TP, PP = {sizes}")
        yield
        return
    process_groups.init_distributed(process_groups.ParallelDims(), backend=backend)
    try:
        yield
    finally:
        process_groups.destroy_distributed()


@contextlib.contextmanager
def _rng_tracker_seeded():
    """Megatron-Core's ``MambaMixer`` forks the CUDA RNG tracker even when not initialising;
    seed it if nobody has, restoring the CPU generator's state afterwards."""
    from megatron_hybrid import mcore

    tracker = mcore.tensor_parallel.get_cuda_rng_tracker()
    if tracker.is_initialized():
        yield
        return
    cpu_state = torch.get_rng_state()
    mcore.tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.set_rng_state(cpu_state)
    try:
        yield
    finally:
        tracker.reset()
        torch.set_rng_state(cpu_state)
