"""ModelConfig -> Megatron-Core TransformerConfig -> MambaModel for one pipeline stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_hybrid import mcore
from megatron_hybrid.model import adapters, specs
from megatron_hybrid.model import precision as precisions
from megatron_hybrid.model.config import ModelConfig, PeftConfig


@dataclass(frozen=True, kw_only=True)
class ModelLayout:
    """How one model instance is laid out across ranks (the parts the model itself needs)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    """Expert parallel: each rank holds num_moe_experts / ep of every MoE layer's experts."""
    etp: int | None = None
    """Expert tensor parallel (None: tp, Megatron-Core's default)."""
    moe_dispatcher: str = "alltoall"
    """Megatron-Core's token dispatcher: alltoall or allgather."""
    sequence_parallel: bool = False
    precision: str = "fp32"
    """fp32, bf16 or an FP8 recipe of :data:`precision.FP8_RECIPES` (bf16 weights around it)."""
    recompute: str = "none"
    """none | selective (core attention) | full (every layer's input kept, layer recomputed)."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers)."""

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else torch.bfloat16


def fusion_options(backend: str) -> dict:
    """TransformerConfig fusions: on cuda the fused kernels Megatron-Bridge's Nemotron-H and
    Nano 2 recipes use; the cpu backend has none of them (they need CUDA, apex or TE).
    Gradient-accumulation fusion needs apex besides, as Megatron-LM turns it off without.
    ``bias_activation_fusion`` stays off on both: the layers have no bias and Megatron-Core
    fuses only GeLU/SiLU, not squared ReLU (its config refuses the combination)."""
    on_gpu = backend == "cuda"
    grad_fusion = on_gpu and mcore.gradient_accumulation_fusion_available()
    return {"gradient_accumulation_fusion": grad_fusion, "bias_dropout_fusion": on_gpu,
            "masked_softmax_fusion": on_gpu, "persist_layer_norm": on_gpu,
            "cross_entropy_loss_fusion": on_gpu, "cross_entropy_fusion_impl": "native",
            "bias_activation_fusion": False}


def moe_options(model: ModelConfig) -> dict:
    """TransformerConfig's MoE fields from the ``model:`` section (none without experts)."""
    if not model.num_moe_experts:
        return {}
    return {
        "num_moe_experts": model.num_moe_experts,
        "moe_router_topk": model.moe_router_topk,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size or model.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
        "moe_router_score_function": model.moe_router_score_function,
        "moe_router_pre_softmax": model.moe_router_pre_softmax,
        "moe_router_topk_scaling_factor": model.moe_router_topk_scaling_factor,
        "moe_router_enable_expert_bias": model.moe_router_enable_expert_bias,
        "moe_router_bias_update_rate": model.moe_router_bias_update_rate,
        "moe_aux_loss_coeff": model.moe_aux_loss_coeff,
        "moe_router_dtype": model.moe_router_dtype,
    }


def recompute_options(recompute: str) -> dict:
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return {}


def transformer_config(model: ModelConfig, layout: ModelLayout = ModelLayout(), *,
                       perform_initialization: bool = True, backend: str = "cpu",
                       use_cpu_initialization: bool = False) -> "mcore.TransformerConfig":
    """Megatron-Core's TransformerConfig for a Nemotron-H style model: squared-ReLU MLP, no
    bias, RMSNorm, no dropout, the ``backend``'s fusions; ``finalize_model_grads`` wired
    (sequence-parallel norm grads are otherwise never all-reduced)."""
    config = mcore.TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        is_hybrid_model=True,
        mamba_state_dim=model.mamba_state_dim,
        mamba_head_dim=model.mamba_head_dim,
        mamba_num_groups=model.mamba_num_groups,
        mamba_num_heads=model.mamba_num_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        qk_layernorm=model.qk_layernorm,
        add_bias_linear=False,
        gated_linear_unit=False,
        activation_func=mcore.squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        **moe_options(model),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        moe_token_dispatcher_type=layout.moe_dispatcher,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=layout.params_dtype,
        pipeline_dtype=layout.params_dtype,
        bf16=layout.params_dtype == torch.bfloat16,
        perform_initialization=perform_initialization,
        use_cpu_initialization=use_cpu_initialization,
        apply_rope_fusion=False,  # no rotary embedding in this family
        tp_comm_overlap=layout.tp_comm_overlap,
        cuda_graph_scope=[],  # the whole layer; the default "full" is deprecated and warns
        **fusion_options(backend),
        **precisions.transformer_config_fields(layout.precision),
        **recompute_options(layout.recompute),
    )
    config.finalize_model_grads_func = mcore.finalize_model_grads
    return config


@contextlib.contextmanager
def tp_comm_overlap_buffers(model: ModelConfig, layout: ModelLayout, *, seq_length: int,
                            micro_batch_size: int) -> Iterator[None]:
    """Transformer Engine's userbuffers while the block runs, where ``layout.tp_comm_overlap``
    asks for them: enter it after the process groups start and before a model is built. They
    hold one micro-batch of this rank's context-parallel share of the sequence, gathered over
    tensor parallel, as Megatron-LM sizes them."""
    if not layout.tp_comm_overlap:
        yield
        return
    recipe = precisions.fp8_recipe(layout.precision)
    mcore.initialize_te_userbuffers(
        shape=[seq_length * micro_batch_size // layout.cp, model.hidden_size],
        tp_size=layout.tp, use_fp8=recipe is not None,
        bf16_layers=recipe is None or recipe.bf16_layers_at_start + recipe.bf16_layers_at_end > 0,
        dtype=layout.params_dtype)
    try:
        yield
    finally:
        mcore.destroy_te_userbuffers()


def mixer_params(model: ModelConfig) -> dict:
    """Keyword arguments of every Mamba mixer (:class:`specs.DtClampedMambaMixer`)."""
    return {"chunk_size": model.mamba_chunk_size, "dt_min": model.mamba_dt_min,
            "dt_max": model.mamba_dt_max, "dt_clamp_min": model.mamba_dt_clamp_min}


def parallel_heads_options(model: ModelConfig) -> dict:
    """``specs.stack_spec``'s Hymba options of ``model``: the ``H`` layers' attention window
    and the meta tokens it always sees (where the pattern has ``H`` layers), and the meta
    tokens."""
    attention = ({"window": model.attention_window, "visible_prefix": model.num_meta_tokens}
                 if model.layer_pattern.counts["H"] else None)
    return {"parallel_heads_attention": attention, "num_meta_tokens": model.num_meta_tokens}


def build_model(model: ModelConfig, layout: ModelLayout, *, backend: str,
                perform_initialization: bool = True, use_cpu_initialization: bool = False,
                peft: PeftConfig | None = None) -> "mcore.MambaModel":
    """This rank's pipeline stage of ``model`` (process groups must be initialised);
    ``use_cpu_initialization`` leaves the weights' device to torch's default (Megatron-Core's
    name: they are made on the CPU unless a device context says otherwise). With ``peft``'s
    LoRA on, the targeted linears carry adapters and everything else is frozen."""
    model.validate()
    parallel_state = mcore.parallel_state
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stages = model.layer_pattern.stages(layout.pp)
    built = mcore.MambaModel(
        config=transformer_config(model, layout, perform_initialization=perform_initialization,
                                  backend=backend, use_cpu_initialization=use_cpu_initialization),
        mamba_stack_spec=specs.stack_spec(backend, [len(s) for s in stages],
                                          mixer_params(model),
                                          transformer_impl=model.transformer_impl,
                                          peft=peft,
                                          stability={name: getattr(model, name) for name
                                                     in model.stability_options},
                                          layer_sizes=model.layer_overrides,
                                          **parallel_heads_options(model)),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == layout.pp - 1,
        hybrid_override_pattern=model.layer_pattern.layers,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        pg_collection=mcore.ProcessGroupCollection.use_mpu_process_groups(),
    )
    if peft is not None and peft.enabled:
        adapters.freeze_base(built)
    return built
