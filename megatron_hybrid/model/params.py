"""Parameter counts from the real models, built on the meta device (no weight memory).

:func:`count_parameters` builds this project's Megatron-Core ``MambaModel`` (TP=1, PP=1, cpu
backend) with Megatron-Core's explicit cuda-device allocations sent to ``meta``
(``backends.cpu.cuda_device_is``), so even the 56B builds in well under a second and without
allocating weights. :func:`hf_parameter_count` builds HF's ``NemotronHForCausalLM`` for the
same config on ``meta``: the independent count the published flavors are checked against.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_hybrid.model.config import ModelConfig

KIND_KEYS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
"""Pattern symbol -> the key of its per-kind sum in :func:`count_parameters`."""


def count_parameters(cfg: ModelConfig) -> dict:
    """Parameters of the Megatron-Core model of ``cfg`` (TP=1, PP=1, untied output layer).

    Returns ``total``, ``embedding``, ``output_layer``, ``final_norm``, one sum per layer kind
    (``mamba``, ``attention``, ``mlp``, ``moe``; zero when absent) and ``per_layer`` (a list
    in pattern order, as ``pattern.describe(params_per_layer=...)`` takes).

    Needs the cpu backend (installed here if no backend is, which pins this process to it)
    and a TP=1/PP=1 model-parallel state (a 1-process gloo group is started here, and torn
    down again, when none exists). The caller's RNG states are left as they were.
    """
    with single_process_model_parallel():
        model = build_on_meta(cfg)
        try:
            return _tally(model, cfg)
        finally:
            del model


def hf_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of HF ``NemotronHForCausalLM`` for ``cfg``, built on the meta device."""
    from transformers import NemotronHForCausalLM

    from megatron_hybrid.model.hf_mapping import hf_config_from_model

    with torch.device("meta"):
        model = NemotronHForCausalLM(hf_config_from_model(cfg))
    return sum(p.numel() for p in model.parameters())


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
        **{key: sum(n for n, s in zip(per_layer, layers) if s == symbol)
           for symbol, key in KIND_KEYS.items()},
        "per_layer": per_layer,
    }
    parts = ("embedding", "output_layer", "final_norm", *KIND_KEYS.values())
    if sum(counts[key] for key in parts) != counts["total"]:
        raise AssertionError(f"parameter parts do not add up to the total: {counts}")
    return counts


def build_on_meta(cfg: ModelConfig):
    from megatron_hybrid.backends.cpu import cuda_device_is
    from megatron_hybrid.model.build import ModelLayout, build_model

    with _rng_tracker_seeded(), torch.device("meta"), cuda_device_is("meta"):
        return build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False)


@contextlib.contextmanager
def single_process_model_parallel():
    """A model-parallel state to build a whole model in: this process's (TP=PP=1), or a
    1-process group on the cpu backend started here and torn down after."""
    from megatron_hybrid import backends

    if backends.active() is None:
        backends.install("cpu")
    elif backends.active() != "cpu":
        raise RuntimeError(f"whole-model builds (parameter counts, planner probes) run on the "
                           f"cpu backend; this process runs backend={backends.active()!r}: "
                           f"run them in a separate process")
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
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
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
