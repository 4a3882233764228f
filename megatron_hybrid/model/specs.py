"""Megatron-Core module specs per backend, and the few modules the cpu backend adds.

Behaviour changes by swapping specs, never by editing model code:
- Transformer Engine (``model.transformer_impl=transformer_engine`` on cuda): Megatron-Core's
  own Transformer-Engine + mamba_ssm layer specs, unchanged.
- local (the cpu backend, and ``transformer_impl=local`` on cuda): ColumnParallel/RowParallel
  linears, :class:`TorchRMSNorm`, :class:`SDPAttention`, with the norm state-dict keys
  remapped to TE's fused-norm names, so checkpoints move between the two both ways (as
  Megatron-Core's ModelOpt spec does with ``remap_te_layernorm``).
Both wrap the layers in ``model/stack.py``'s HybridStack, which splits pipeline stages by the
pattern and implements full activation recompute (Megatron-Core 0.16's MambaStack ignores it),
per-layer sizes and Hymba's meta tokens, and both build their Mamba mixers as
:class:`DtClampedMambaMixer` (HF NemotronH's dt clamp). The local spec also builds the
pattern's ``H`` layers (``model/parallel_heads.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron_hybrid import mcore
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model import adapters, parallel_heads
from megatron_hybrid.model.config import PeftConfig
from megatron_hybrid.model.stack import HybridStack, MetaTokenStack

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
                 logit_softcap: float = 0.0, window: int = 0, visible_prefix: int = 0,
                 **kwargs):
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
        self.window, self.visible_prefix = window, visible_prefix
        """``model.attention_window`` and the meta tokens every query sees (:func:`causal_mask`)."""
        if window and self.cp_group.size() > 1:
            raise ConfigError("model.attention_window is not implemented under context "
                              "parallel: set parallel.cp=1 or the window to 0")

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
        if q_len != k_len or self.logit_softcap or self.window:
            mask = causal_mask(q_len, k_len, q.device, self.window, self.visible_prefix)
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


def causal_mask(q_len: int, k_len: int, device, window: int = 0,
                visible_prefix: int = 0) -> torch.Tensor:
    """``[q_len, k_len]``, True where a query (the last ``q_len`` of ``k_len`` positions) sees a
    key: the keys up to its own position; with a ``window``, only the ``window`` last of them
    (itself included) and the first ``visible_prefix`` keys (meta tokens) besides."""
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    if not window:
        return causal
    recent = torch.ones_like(causal).triu(k_len - q_len - window + 1)
    recent[:, :visible_prefix] = True
    return causal & recent


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


def _parallel_heads_layer(mixer_params: dict, stability: dict,
                          attention: dict) -> "mcore.ModuleSpec":
    """Hymba's hybrid-head layer (:class:`parallel_heads.ParallelHeadsLayer`) of the local
    parts; ``attention`` holds its SDPAttention's ``window`` and ``visible_prefix``."""
    qk_norm = TorchRMSNorm if stability.get("qk_layernorm") else None
    core = mcore.ModuleSpec(module=SDPAttention, params={
        "logit_softcap": stability.get("attention_logit_softcap") or 0.0, **attention})
    return mcore.ModuleSpec(
        module=parallel_heads.ParallelHeadsLayer,
        submodules=parallel_heads.ParallelHeadsSubmodules(
            norm=TorchRMSNorm,
            self_attention=mcore.ModuleSpec(
                module=mcore.SelfAttention,
                params={"attn_mask_type": mcore.AttnMaskType.causal},
                submodules=mcore.SelfAttentionSubmodules(
                    linear_qkv=mcore.ColumnParallelLinear, core_attention=core,
                    linear_proj=parallel_heads.Unprojected, q_layernorm=qk_norm,
                    k_layernorm=qk_norm)),
            # No group norm in the mixer: the layer norms the whole branch output instead.
            mixer=mcore.ModuleSpec(
                module=DtClampedMambaMixer, params={**mixer_params, "rmsnorm": False},
                submodules=mcore.MambaMixerSubmodules(
                    in_proj=mcore.ColumnParallelLinear, out_proj=parallel_heads.Unprojected)),
            out_proj=mcore.RowParallelLinear,
        ),
    )


@dataclasses.dataclass
class HybridStackSubmodules(mcore.MambaStackSubmodules):
    """MambaStack's layer specs and, where the pattern has ``H`` layers, theirs."""

    parallel_heads_layer: "mcore.ModuleSpec | None" = None


def local_stack_submodules(mixer_params: dict, peft: PeftConfig | None = None,
                           stability: dict | None = None,
                           parallel_heads_attention: dict | None = None
                           ) -> HybridStackSubmodules:
    """The local layers (the cpu backend's, and ``transformer_impl=local`` on cuda): local
    linears, torch norms, SDPA, and the Mamba kernels the backend registered (the cpu
    backend's torch kernels or mamba_ssm's); ``mixer_params`` are the Mamba mixers' keyword
    arguments; the linears ``peft`` targets are LoRA linears, MoE experts' included;
    ``stability`` turns on the model's training-stability options (``STABILITY_OPTIONS``);
    ``parallel_heads_attention`` (where the pattern has ``H`` layers) their attention's
    ``window`` and ``visible_prefix``."""
    stability = stability or {}
    dense_mlp = mcore.ModuleSpec(
        module=PostNormMLP if stability.get("post_sublayer_norm") else mcore.MLP,
        submodules=_mlp_linears(peft))
    if parallel_heads_attention is not None and peft is not None and peft.enabled:
        raise ConfigError("peft.method=lora does not adapt the parallel-heads ('H') layers: "
                          "train them in full (peft.method=none) or use a pattern without 'H'")
    return HybridStackSubmodules(
        mamba_layer=_mamba_layer(mixer_params, peft),
        attention_layer=_attention_layer(peft, stability),
        mlp_layer=_mlp_layer(dense_mlp, TRANSFORMER_TE_KEY_MAP),
        # The TE spec's MoE layer has its own norm (TENorm) named as ours: no fused name.
        moe_layer=_mlp_layer(_moe_mlp(peft), {}),
        parallel_heads_layer=(None if parallel_heads_attention is None else
                              _parallel_heads_layer(mixer_params, stability,
                                                    parallel_heads_attention)),
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
               stability: dict | None = None,
               layer_sizes: dict | None = None,
               parallel_heads_attention: dict | None = None,
               num_meta_tokens: int = 0) -> "mcore.ModuleSpec":
    """The decoder spec for ``backend`` and ``transformer_impl`` (Transformer Engine's only
    on cuda) with the pattern's pipeline stage sizes, the Mamba mixers' keyword arguments
    (``chunk_size``, ``dt_min``, ``dt_max``, ``dt_clamp_min``), ``peft``'s adapters, the
    ``stability`` options turned on (model key -> value), the per-layer sizes
    (``model.layer_overrides``), the ``H`` layers' attention options (see
    :func:`local_stack_submodules`) and ``num_meta_tokens`` (:class:`MetaTokenStack`)."""
    if implementation(backend, transformer_impl) == "transformer_engine":
        if peft is not None and peft.enabled:
            raise ConfigError("peft.method=lora adapts the local spec's linears: set "
                              "model.transformer_impl=local")
        if stability:
            raise ConfigError(f"model.{', model.'.join(stability)}: the local spec builds "
                              "these (Transformer Engine's attention has no soft-cap): set "
                              "model.transformer_impl=local")
        if parallel_heads_attention is not None:
            raise ConfigError("model.pattern's parallel-heads ('H') layers are built by the "
                              "local spec: set model.transformer_impl=local")
        submodules, final_norm = te_stack_submodules(mixer_params), mcore.te_norm_class()
    else:
        submodules, final_norm = (local_stack_submodules(mixer_params, peft, stability,
                                                         parallel_heads_attention),
                                  TorchRMSNorm)
    meta = {"num_meta_tokens": num_meta_tokens} if num_meta_tokens else {}
    return mcore.ModuleSpec(
        module=MetaTokenStack if num_meta_tokens else HybridStack,
        submodules=submodules,
        params={"stage_sizes": tuple(stage_sizes), "final_norm": final_norm,
                "layer_sizes": layer_sizes or {}, **meta},
    )
