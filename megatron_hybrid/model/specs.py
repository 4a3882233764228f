"""Megatron-Core module specs per backend, and the few modules the cpu backend adds.

Behaviour changes by swapping specs, never by editing model code:
- Transformer Engine (``model.transformer_impl=transformer_engine`` on cuda): Megatron-Core's
  own Transformer-Engine + mamba_ssm layer specs, unchanged.
- local (the cpu backend, and ``transformer_impl=local`` on cuda): ColumnParallel/RowParallel
  linears, :class:`TorchRMSNorm`, :class:`SDPAttention`, with the norm state-dict keys
  remapped to TE's fused-norm names, so checkpoints move between the two both ways (as
  Megatron-Core's ModelOpt spec does with ``remap_te_layernorm``).
Both wrap the layers in :class:`HybridStack`, which splits pipeline stages by the pattern and
implements full activation recompute (Megatron-Core 0.16's MambaStack ignores it), and both
build their Mamba mixers as :class:`DtClampedMambaMixer` (HF NemotronH's dt clamp).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron_hybrid import mcore
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model import adapters
from megatron_hybrid.model.config import PeftConfig

# Local norm names -> the names of Transformer Engine's fused norm+linear parameters.
from megatron_hybrid.parallel import context_parallel

MAMBA_TE_KEY_MAP = {"norm.": "mixer.in_proj.layer_norm_"}
TRANSFORMER_TE_KEY_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class TorchRMSNorm(torch.nn.Module):
    """RMSNorm in plain PyTorch with Megatron-Core's norm constructor signature."""

    def __init__(self, config: "mcore.TransformerConfig", hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Norm grads are partial under sequence parallel; finalize_model_grads all-reduces them.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)


class SDPAttention(mcore.DotProductAttention):
    """Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``,
    context parallel included (:func:`context_parallel.attention`), and packed documents
    (THD ``packed_seq_params``) kept apart: no attention across their boundaries.

    Subclasses Megatron-Core's DotProductAttention so ModelOpt recognises it (head pruning),
    but avoids its CUDA global memory buffer and fused-softmax kernels.
    """

    def __init__(self, config: "mcore.TransformerConfig", *args, pg_collection=None,
                 logit_softcap: float = 0.0, **kwargs):
        # DotProductAttention refuses CP > 1 (on GPUs only TE's attention does CP): build it
        # from a CP=1 view of the config, then keep the real one.
        cp1_view = copy.copy(config)
        cp1_view.context_parallel_size = 1
        super().__init__(cp1_view, *args, pg_collection=pg_collection, **kwargs)
        self.config = config
        self.cp_group = (pg_collection.cp if pg_collection is not None
                         else mcore.parallel_state.get_context_parallel_group())
        context_parallel.check_matches_groups(config.context_parallel_size, self.cp_group.size())
        self.logit_softcap = logit_softcap
        """``model.attention_logit_softcap``: scores capped to ``cap * tanh(score / cap)``."""
        if logit_softcap and self.cp_group.size() > 1:
            raise ConfigError("model.attention_logit_softcap is not implemented under context "
                              "parallel: set parallel.cp=1 or the cap to 0")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, dropout_p)
        seq_len, batch = query.shape[:2]
        if self.cp_group.size() > 1:
            out = context_parallel.attention(query, key, value, group=self.cp_group,
                                             scale=self.softmax_scale, dropout_p=dropout_p)
        else:
            # [s, b, heads, dim] -> [b, heads, s, dim]; key/value keep their query-group heads.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = self._causal(q, k, v, dropout_p)
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)

    def _causal(self, q, k, v, dropout_p: float):
        """Causal attention of the queries, which are the last ``q_len`` of the ``k_len``
        positions (bottom-right aligned). At decode Megatron-Core passes the cached keys and
        ``AttnMaskType.no_mask`` (transformer/attention.py:520, after the prompt's step): for
        one query that is the same as this mask, and for several new ones this mask is the
        right one. SDPA's own ``is_causal`` aligns top-left: one query would see only key 0."""
        q_len, k_len = q.shape[-2], k.shape[-2]
        mask = None
        if q_len != k_len or self.logit_softcap:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        if self.logit_softcap:
            return self._soft_capped(q, k, v, mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=self.softmax_scale, dropout_p=dropout_p,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def _soft_capped(self, q, k, v, mask, dropout_p: float):
        """Attention with the scores soft-capped before the softmax (SDPA has no cap)."""
        groups = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
        scores = self.logit_softcap * torch.tanh(scores / self.logit_softcap)
        probs = scores.masked_fill(~mask, -math.inf).softmax(dim=-1).to(q.dtype)
        return torch.matmul(F.dropout(probs, p=dropout_p), v)

    def _packed(self, query, key, value, packed_seq_params, dropout_p: float):
        """THD attention (``[tokens, heads, dim]``, as SelfAttention squeezes it): causal
        within each document of ``cu_seqlens_q``, none across, so packed documents are as
        if alone. Tokens after the last boundary form one more document, as in the Mamba
        mixer's ``seq_idx``."""
        if self.cp_group.size() > 1:
            raise NotImplementedError("packed sequences (packed_seq_params) are not supported "
                                      "with context parallel on the cpu backend: set "
                                      "parallel.cp=1 or do not pack")
        total = query.shape[0]
        bounds = sorted({0, total, *(min(int(b), total)
                                     for b in packed_seq_params.cu_seqlens_q.tolist())})
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
        out = torch.cat([self._causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p)
                         for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
        return out.squeeze(0).permute(1, 0, 2).reshape(total, 1, -1)


def softplus_inverse(value: float) -> float:
    """The ``u`` with ``softplus(u) == value`` (> 0), computed without overflow or cancellation."""
    return value + math.log(-math.expm1(-value))


def raise_dt_columns(zxBCdt: torch.Tensor, dt_bias: torch.Tensor, dt_min: float) -> torch.Tensor:
    """The in-projection ``zxBCdt`` (dt in its last ``len(dt_bias)`` columns) with each dt
    raised to at least ``softplus_inverse(dt_min) - dt_bias``: softplus is increasing, so a
    kernel computing ``softplus(dt + dt_bias)`` from it computes
    ``max(softplus(dt + dt_bias), dt_min)``, with no gradient where the floor binds."""
    heads = dt_bias.shape[0]
    rest, dt = zxBCdt.split([zxBCdt.shape[-1] - heads, heads], dim=-1)
    floor = (softplus_inverse(dt_min) - dt_bias.float()).to(dt.dtype)
    return torch.cat([rest, torch.maximum(dt, floor)], dim=-1)


class DtClampedMambaMixer(mcore.MambaMixer):
    """Megatron-Core's MambaMixer computing HF NemotronH's step size,
    ``dt = max(softplus(dt + dt_bias), dt_clamp_min)`` (Megatron-Core 0.16.1 passes no
    ``dt_limit`` to its kernels, so it never clamps).

    The clamp is applied to the kernels' input (:func:`raise_dt_columns`), just before each
    of Megatron-Core's three kernel paths: training (``mamba_split_conv1d_scan_combined``),
    prefill (``mamba_chunk_scan_combined``) and single-token decode
    (``selective_state_update``). So every kernel that takes the raw dt with ``dt_bias`` and
    softplus, the cpu backend's or mamba_ssm's on GPUs, computes the clamped dt, and none
    needs a ``dt_limit`` argument (``selective_state_update`` has none). ``forward`` stays
    Megatron-Core's: ModelOpt recognises a mixer subclass only by it. ``dt_clamp_min=0`` is
    Megatron-Core's mixer unchanged.
    """

    def __init__(self, *args, dt_clamp_min: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dt_clamp_min = dt_clamp_min

    def _clamped(self, zxBCdt: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        if self.dt_clamp_min <= 0:
            return zxBCdt
        return raise_dt_columns(zxBCdt, dt_bias, self.dt_clamp_min)

    def _ssm_training(self, zxBCdt, *args, **kwargs):
        return super()._ssm_training(self._clamped(zxBCdt, self.cp.get_dt_bias()),
                                     *args, **kwargs)

    def _ssm_prefill(self, zxBCdt, *args, **kwargs):
        return super()._ssm_prefill(self._clamped(zxBCdt, self.cp.get_dt_bias()),
                                    *args, **kwargs)

    def _ssm_decode(self, zxBCdt, *args, **kwargs):
        # Decode runs without context parallel and reads the whole (TP-local) dt_bias.
        return super()._ssm_decode(self._clamped(zxBCdt, self.dt_bias), *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # A LoRA in_proj's B has in_proj's rows: saved in the same [z, x, B, C, dt] pieces as
        # its weight, so it reshards across TP sizes as the weight does.
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        lora_b = f"{prefix}in_proj.lora_B"
        if lora_b in state:
            groups = self.ngroups_local_tp * self.d_state
            sections = [self.d_inner_local_tp, self.d_inner_local_tp, groups, groups,
                        self.nheads_local_tp]
            state[lora_b] = mcore.mamba_mixer_module._split_tensor_factory(
                state[lora_b], sections, ["z", "x", "B", "C", "dt"], 0)
        return state


class PostNormed:
    """An attention or MLP sublayer whose output passes an RMSNorm before the residual add
    (``model.post_sublayer_norm``; Megatron-Core's layers have no such norm)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.post_norm = TorchRMSNorm(self.config, self.config.hidden_size,
                                      eps=self.config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        return self.post_norm(output), bias


class PostNormSelfAttention(PostNormed, mcore.SelfAttention):
    """Megatron-Core's self-attention with a norm on its output."""


class PostNormMLP(PostNormed, mcore.MLP):
    """Megatron-Core's MLP with a norm on its output."""


class HybridStack(mcore.MambaStack):
    """MambaStack whose pipeline stages follow the pattern's split exactly.

    Megatron-Core 0.16's MambaStack gives each stage ``num_layers // pp`` layers (dropping the
    rest silently), always builds a Transformer-Engine final norm and ignores
    ``recompute_granularity="full"``; here the stage sizes come from the pattern module, the
    final norm from the spec, and full recompute from the :class:`RecomputedLayer` subclasses
    in place of the spec's layers (:func:`stack_layers`).
    """

    def __init__(self, config, submodules, *, stage_sizes, final_norm, post_layer_norm=True,
                 **kwargs):
        self.stage_sizes = tuple(stage_sizes)
        super().__init__(config, stack_layers(submodules, config), post_layer_norm=False,
                         **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = mcore.build_module(
                final_norm, config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon)
        # Transformer layers number themselves assuming an even split; renumber globally
        # (the numbers key the sharded checkpoint).
        first = sum(self.stage_sizes[: self.pp_group.rank()])
        for index, layer in enumerate(self.layers):
            layer.layer_number = first + index + 1

    def _select_layers_for_pipeline_parallel(self, layer_type_list):
        rank = self.pp_group.rank()
        if len(self.stage_sizes) != self.pp_group.size():
            raise ValueError(f"{len(self.stage_sizes)} pattern stages for a pipeline of "
                             f"{self.pp_group.size()} ranks")
        first = sum(self.stage_sizes[:rank])
        return first, layer_type_list[first : first + self.stage_sizes[rank]]


class RecomputedLayer:
    """Full recompute of the layer class it is mixed into: only the layer's input is kept for
    backward, which runs the forward again (RNG states restored, non-tensor outputs skipped).
    Under FP8 it is Transformer Engine's checkpoint, which recomputes in FP8 as the forward
    ran; otherwise Megatron-Core's (as its TransformerBlock chooses)."""

    def __init__(self, *args, pg_collection, **kwargs):
        super().__init__(*args, pg_collection=pg_collection, **kwargs)
        self.recompute_tp_group = pg_collection.tp

    def forward(self, hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(hidden_states, *args, **kwargs)

        def layer(hidden):
            return super(RecomputedLayer, self).forward(hidden, *args, **kwargs)

        if self.config.fp8:
            return mcore.te_checkpoint(layer, False, mcore.tensor_parallel.get_cuda_rng_tracker,
                                       self.recompute_tp_group, hidden_states)
        return mcore.tensor_parallel.checkpoint(layer, False, hidden_states)


class RecomputedMambaLayer(RecomputedLayer, mcore.MambaLayer):
    """A Mamba layer under full recompute."""


class RecomputedTransformerLayer(RecomputedLayer, mcore.TransformerLayer):
    """An attention or MLP layer of the local spec under full recompute."""


class RecomputedMLPLayer(RecomputedLayer, mcore.MLPLayer):
    """An MLP layer of Megatron-Core's Transformer Engine spec under full recompute."""


class RecomputedMoETransformerLayer(RecomputedLayer, mcore.MoETransformerLayer):
    """A MoE layer of Megatron-Core's Transformer Engine spec under full recompute."""


RECOMPUTED_LAYERS = {
    mcore.MambaLayer: RecomputedMambaLayer,
    mcore.TransformerLayer: RecomputedTransformerLayer,
    mcore.MLPLayer: RecomputedMLPLayer,
    mcore.MoETransformerLayer: RecomputedMoETransformerLayer,
}
"""Every layer class of every spec -> its recomputed subclass (same parameters and keys)."""


def recomputed_layers(submodules: "mcore.MambaStackSubmodules") -> "mcore.MambaStackSubmodules":
    """The stack's layer specs with the recomputed layer classes; a layer class without one is
    refused, so no layer silently goes without recompute."""
    replaced = {}
    for name, spec in vars(submodules).items():
        if not isinstance(spec, mcore.ModuleSpec):
            continue
        if spec.module not in RECOMPUTED_LAYERS:
            raise TypeError(f"{name}: no recomputed class for {spec.module.__qualname__}: add "
                            f"one to specs.RECOMPUTED_LAYERS")
        replaced[name] = dataclasses.replace(spec, module=RECOMPUTED_LAYERS[spec.module])
    return dataclasses.replace(submodules, **replaced)


def stack_layers(submodules: "mcore.MambaStackSubmodules",
                 config: "mcore.TransformerConfig") -> "mcore.MambaStackSubmodules":
    """The layer specs :class:`HybridStack` builds under ``config``."""
    if config.recompute_granularity == "full":
        return recomputed_layers(submodules)
    return submodules


def _mamba_layer(mixer_params: dict, peft: PeftConfig | None) -> "mcore.ModuleSpec":
    return mcore.ModuleSpec(
        module=mcore.MambaLayer,
        submodules=mcore.MambaLayerSubmodules(
            norm=TorchRMSNorm,
            mixer=mcore.ModuleSpec(
                module=DtClampedMambaMixer,
                params=mixer_params,
                submodules=mcore.MambaMixerSubmodules(
                    in_proj=adapters.linear_spec("in_proj", peft),
                    out_proj=adapters.linear_spec("out_proj", peft)),
            ),
            mamba_bda=mcore.get_bias_dropout_add,
            sharded_state_dict_keys_map=MAMBA_TE_KEY_MAP,
        ),
    )


def _core_attention(stability: dict):
    cap = stability.get("attention_logit_softcap")
    return mcore.ModuleSpec(module=SDPAttention, params={"logit_softcap": cap}) if cap else \
        SDPAttention


def _attention_layer(peft: PeftConfig | None, stability: dict) -> "mcore.ModuleSpec":
    qk_norm = TorchRMSNorm if stability.get("qk_layernorm") else None
    return mcore.ModuleSpec(
        module=mcore.TransformerLayer,
        submodules=mcore.TransformerLayerSubmodules(
            input_layernorm=TorchRMSNorm,
            self_attention=mcore.ModuleSpec(
                module=(PostNormSelfAttention if stability.get("post_sublayer_norm")
                        else mcore.SelfAttention),
                params={"attn_mask_type": mcore.AttnMaskType.causal},
                submodules=mcore.SelfAttentionSubmodules(
                    linear_qkv=adapters.linear_spec("qkv", peft),
                    core_attention=_core_attention(stability),
                    linear_proj=adapters.linear_spec("proj", peft),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=mcore.get_bias_dropout_add,
            sharded_state_dict_keys_map=TRANSFORMER_TE_KEY_MAP,
        ),
    )


def _mlp_layer(mlp: "mcore.ModuleSpec", keys_map: dict) -> "mcore.ModuleSpec":
    return mcore.ModuleSpec(
        module=mcore.TransformerLayer,
        submodules=mcore.TransformerLayerSubmodules(
            pre_mlp_layernorm=TorchRMSNorm,
            mlp=mlp,
            mlp_bda=mcore.get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _mlp_linears(peft: PeftConfig | None) -> "mcore.MLPSubmodules":
    return mcore.MLPSubmodules(linear_fc1=adapters.linear_spec("fc1", peft),
                               linear_fc2=adapters.linear_spec("fc2", peft))


def _moe_mlp(peft: PeftConfig | None) -> "mcore.ModuleSpec":
    """Megatron-Core's local MoE layer (SequentialMLP experts, and a shared expert when the
    config sets one) with the dense MLP's fc1 / fc2 in every routed expert and the shared
    expert: ``peft``'s fc1 / fc2 targets adapt them all. Its spec's ``num_experts`` only has
    to be set; the config's count builds the experts."""
    spec = mcore.get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=False)
    moe = spec.submodules
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        moe, experts=dataclasses.replace(moe.experts, submodules=_mlp_linears(peft)),
        shared_experts=dataclasses.replace(moe.shared_experts, submodules=_mlp_linears(peft))))


def local_stack_submodules(mixer_params: dict, peft: PeftConfig | None = None,
                           stability: dict | None = None) -> "mcore.MambaStackSubmodules":
    """The local layers (the cpu backend's, and ``transformer_impl=local`` on cuda): local
    linears, torch norms, SDPA, and the Mamba kernels the backend registered (the cpu
    backend's torch kernels or mamba_ssm's); ``mixer_params`` are the Mamba mixers' keyword
    arguments; the linears ``peft`` targets are LoRA linears, MoE experts' included;
    ``stability`` turns on the model's training-stability options (``STABILITY_OPTIONS``)."""
    stability = stability or {}
    dense_mlp = mcore.ModuleSpec(
        module=PostNormMLP if stability.get("post_sublayer_norm") else mcore.MLP,
        submodules=_mlp_linears(peft))
    return mcore.MambaStackSubmodules(
        mamba_layer=_mamba_layer(mixer_params, peft),
        attention_layer=_attention_layer(peft, stability),
        mlp_layer=_mlp_layer(dense_mlp, TRANSFORMER_TE_KEY_MAP),
        # The TE spec's MoE layer has its own norm (TENorm) named as ours: no fused name.
        moe_layer=_mlp_layer(_moe_mlp(peft), {}),
    )


def te_stack_submodules(mixer_params: dict) -> "mcore.MambaStackSubmodules":
    """Megatron-Core's own TE + mamba_ssm layer specs (NVIDIA's), with the mixer made a
    :class:`DtClampedMambaMixer` taking ``mixer_params``."""
    stack = mcore.te_mamba_stack_spec().submodules
    layer = stack.mamba_layer
    mixer = dataclasses.replace(layer.submodules.mixer, module=DtClampedMambaMixer,
                                params={**layer.submodules.mixer.params, **mixer_params})
    # Copies along the path to the mixer only: the shared spec stays as NVIDIA wrote it.
    return dataclasses.replace(stack, mamba_layer=dataclasses.replace(
        layer, submodules=dataclasses.replace(layer.submodules, mixer=mixer)))


def implementation(backend: str, transformer_impl: str) -> str:
    """The spec ``model.transformer_impl`` builds on ``backend``: the cpu backend has no
    Transformer Engine and builds local for both values."""
    return transformer_impl if backend == "cuda" else "local"


def stack_spec(backend: str, stage_sizes, mixer_params: dict, *,
               transformer_impl: str = "transformer_engine",
               peft: PeftConfig | None = None,
               stability: dict | None = None) -> "mcore.ModuleSpec":
    """The decoder spec for ``backend`` and ``transformer_impl`` (Transformer Engine's only
    on cuda) with the pattern's pipeline stage sizes, the Mamba mixers' keyword arguments
    (``chunk_size``, ``dt_min``, ``dt_max``, ``dt_clamp_min``), ``peft``'s adapters and the
    ``stability`` options turned on (model key -> value)."""
    if implementation(backend, transformer_impl) == "transformer_engine":
        if peft is not None and peft.enabled:
            raise ConfigError("peft.method=lora adapts the local spec's linears: set "
                              "model.transformer_impl=local")
        if stability:
            raise ConfigError(f"model.{', model.'.join(stability)}: the local spec builds "
                              "these (Transformer Engine's attention has no soft-cap): set "
                              "model.transformer_impl=local")
        submodules, final_norm = te_stack_submodules(mixer_params), mcore.te_norm_class()
    else:
        submodules, final_norm = (local_stack_submodules(mixer_params, peft, stability),
                                  TorchRMSNorm)
    return mcore.ModuleSpec(
        module=HybridStack,
        submodules=submodules,
        params={"stage_sizes": tuple(stage_sizes), "final_norm": final_norm},
    )
