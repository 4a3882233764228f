"""HF ``NemotronHForCausalLM`` <-> Megatron-Core ``MambaModel``: configs and weights.

The one place that knows both naming schemes: :func:`weight_map` lists every Megatron tensor with
the HF tensors it is made of, and the state-dict converters and the streaming checkpoint tools
(``checkpoint/hf_checkpoint.py``) all follow it. It imports torch only where a tensor is built,
so building the CLI parser stays light. Pinned against transformers 5.23
(``transformers/models/nemotron_h``) and Megatron-Core 0.16.1 (``megatron/core/ssm/
mamba_mixer.py``, ``transformer/attention.py``, ``transformer/moe/``). One module because
configs and weights convert by the same rules (a config field decides which tensors exist and
their shapes) and both directions must refuse the same things.

What differs between the two layouts (everything else is a rename):

- Attention: HF has separate ``q_proj``/``k_proj``/``v_proj``; Megatron one fused
  ``linear_qkv`` whose rows are grouped per KV group ``g``: ``[q heads of g, k_g, v_g]`` (HF's
  query head ``h`` uses KV head ``h // (heads / groups)``, the same grouping).
- Norms: each HF block has one ``norm`` before its mixer; Megatron names it after the layer
  kind (``norm`` in Mamba layers, ``input_layernorm`` in attention layers,
  ``pre_mlp_layernorm`` in MLP layers).
- Mamba mixer: identical at TP=1. Both ``in_proj`` outputs are ``[z, x, B, C, dt]`` (HF
  splits ``[gate, x|B|C, dt]``; Megatron's mixer ``z x B C dt``), ``conv1d`` is
  ``[conv_dim, 1, d_conv]`` over ``x|B|C`` in both, ``A_log``/``D``/``dt_bias`` are per head,
  and the gated norm weight is ``[d_inner]`` with ``n_groups`` norm groups in both.

Numerics that a config cannot carry and what is done about them:

- dt clamp. transformers 5.23's mixer computes ``dt = max(softplus(. + dt_bias),
  time_step_min)`` in training and prefill (it does not read ``time_step_limit``); NVIDIA's
  published configs give ``time_step_min=0.001``. Megatron-Core 0.16.1's ``MambaMixer`` passes
  no ``dt_limit`` to its kernels; our mixer (``specs.DtClampedMambaMixer``) clamps at
  ``model.mamba_dt_clamp_min``. Import sets it to ``time_step_min``, so a published checkpoint
  gives HF's logits; export writes ``time_step_min`` and ``time_step_limit`` from it (readers
  that clamp with ``time_step_limit`` then agree too). HF also takes ``time_step_min`` as the low
  end of its random ``dt_bias`` init, so only ``mamba_dt_clamp_min`` 0 or ``mamba_dt_min``
  converts exactly, and a model without the clamp (0, Megatron-Core's behaviour) exports
  ``time_step_min=0.0``: ``from_pretrained`` and meta-device builds work, a fresh
  ``NemotronHForCausalLM(config)`` does not (``math.log(0.0)``). HF's single-token decode step
  (``selective_state_update``, with a cache) does not clamp; ours does, as HF's forward.
- Norm epsilon. Megatron-Core 0.16.1 hard-codes ``eps=1e-5`` for the Mamba gated norm (and
  ``MambaLayer`` builds its pre-norm without passing the config's eps), so only
  ``layer_norm_epsilon == 1e-5`` (every published Nemotron-H config) converts exactly.
- MoE (``E``) layers: Megatron-Core's ``MoELayer`` (``SequentialMLP`` experts, TP=1/EP=1
  names) and HF's ``NemotronHMoE`` hold the same tensors: per expert ``j``
  ``mlp.experts.local_experts.{j}.linear_fc1`` / ``linear_fc2`` <-> ``mixer.experts.{j}.up_proj``
  / ``down_proj``, the router ``mlp.router.weight`` <-> ``mixer.gate.weight``, its expert bias
  (a buffer) ``mlp.router.expert_bias`` <-> ``mixer.gate.e_score_correction_bias``, and the
  shared expert ``mlp.shared_experts.linear_fc1/fc2`` <-> ``mixer.shared_experts.up_proj/
  down_proj``. The per-expert HF names are the published files' (and transformers 5.23's
  ``save_pretrained``'s); transformers' modules stack them into 3-D ``mixer.experts.up_proj``
  [E, f, h] and ``down_proj`` [E, h, f] (:func:`fuse_experts` / :func:`unfuse_experts`).
  The expert bias is float32 on the Megatron side whatever the model's dtype (Megatron-Core's
  router keeps it so), so a lower-precision HF bias is upcast on import.
- MoE routing. HF's ``NemotronHTopkRouter``: sigmoid scores, experts chosen on scores + bias,
  weighted by the unbiased scores, normalized when ``norm_topk_prob``, times
  ``routed_scaling_factor``; Megatron-Core's sigmoid router with an expert bias computes the
  same, normalizing exactly when top-k > 1. What else converts: one shared expert (HF always
  has one), one expert group, no latent projection; anything else is refused in one line
  (:func:`_moe_problems`, :func:`_check_moe`). HF computes the router in float32 whatever the
  model's dtype, so import sets ``moe_router_dtype=fp32``; Nemotron 3's own recipe trains it
  in fp64 (``model.moe_router_dtype=fp64``; the flavors do).

State dicts are the full, unsharded TP=1/PP=1/EP=1 ones (Megatron's ``model.state_dict()``
names; ``*._extra_state`` entries are skipped on export and not produced on import, see
:func:`load_mcore_state_dict`; the router's ``local_tokens_per_expert`` count is a
non-persistent buffer, in no state dict). Converted dicts may share storage with their inputs.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_hybrid.model.config import ModelConfig

if TYPE_CHECKING:
    import torch

HF_PREFIX = "model."
"""Prefix of the decoder in ``NemotronHForCausalLM.state_dict()`` (transformers >= 5)."""
HF_CHECKPOINT_PREFIX = "backbone."
"""Prefix in NVIDIA's published safetensors; transformers 5 renames it to ``model.`` on load."""
MEGATRON_GATED_NORM_EPS = 1e-5
"""Megatron-Core 0.16.1 ``MambaMixer`` builds its gated norm with this eps, whatever the config."""
MEGATRON_CONV_KERNEL = 4
"""``MambaMixer``'s ``d_conv`` default (the specs do not override it)."""
_DEFAULT_DT_MIN = ModelConfig.mamba_dt_min
"""The init's low end a model gets from an HF config without a dt clamp (time_step_min 0)."""
NOT_IN_HF_CONFIG = ("transformer_impl", "moe_router_dtype", "moe_router_bias_update_rate",
                    "moe_aux_loss_coeff")
"""Model fields no HF config carries (how Megatron builds, computes or trains the model, not
its weights): export drops them, import gives the defaults (the router dtype: HF's fp32)."""

class ConversionError(ValueError):
    """A config or state dict cannot be converted exactly; the message says why."""


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def hf_config_from_model(cfg: ModelConfig, **overrides):
    """The ``transformers.NemotronHConfig`` of ``cfg`` (``overrides`` set any HF field last).

    ``time_step_min`` and ``time_step_limit`` carry the dt clamp (see the module docstring).
    ``expand`` is written as 2 like NVIDIA's published configs: neither side reads it (the
    Mamba width is ``mamba_num_heads * mamba_head_dim``).
    """
    from transformers import NemotronHConfig

    layers = cfg.layer_pattern.layers
    if cfg.norm_eps != MEGATRON_GATED_NORM_EPS:
        raise ConversionError(
            f"model.norm_eps={cfg.norm_eps}: Megatron-Core's Mamba norms use 1e-5 whatever the "
            "config, HF uses layer_norm_epsilon everywhere; only 1e-5 converts exactly")
    _check_dt_clamp(cfg)
    if cfg.stability_options:
        raise ConversionError(
            f"model.{', model.'.join(cfg.stability_options)}: HF NemotronH has no QK norm, "
            "sublayer post-norm or attention soft-cap; only a model without them converts")
    if "H" in layers or cfg.num_meta_tokens:
        raise ConversionError(
            "model.pattern's parallel-heads ('H') layers and model.num_meta_tokens (Hymba): HF "
            "NemotronH has no such layer or tokens; only a model without them converts")
    if cfg.layer_overrides:
        raise ConversionError(
            f"model.layer_overrides (layers {sorted(cfg.layer_overrides)}): HF NemotronH has "
            "one size per layer kind; only a model without per-layer sizes converts")
    fields = dict(
        hybrid_override_pattern=layers,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        tie_word_embeddings=False,
        max_position_embeddings=cfg.seq_length,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        attention_bias=False,
        attention_dropout=0.0,
        intermediate_size=cfg.ffn_hidden_size,
        mlp_hidden_act="relu2",
        mlp_bias=False,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        ssm_state_size=cfg.mamba_state_dim,
        n_groups=cfg.mamba_num_groups,
        mamba_hidden_act="silu",
        conv_kernel=MEGATRON_CONV_KERNEL,
        expand=2,
        chunk_size=cfg.mamba_chunk_size,
        use_conv_bias=True,
        use_bias=False,
        mamba_proj_bias=False,
        time_step_min=cfg.mamba_dt_clamp_min,
        time_step_max=cfg.mamba_dt_max,
        time_step_limit=(cfg.mamba_dt_clamp_min, math.inf),
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        residual_in_fp32=False,
        hidden_dropout=0.0,
        **_hf_moe_fields(cfg),
    )
    return NemotronHConfig(**{**fields, **overrides})


def _hf_moe_fields(cfg: ModelConfig) -> dict:
    """HF NemotronH's MoE fields for ``cfg``'s ``E`` layers (checked by :func:`_check_moe`):
    top-k normalization as Megatron-Core's sigmoid router does it (topk > 1); one expert
    group."""
    if "E" not in cfg.layer_pattern.layers:
        return {}
    _check_moe(cfg)
    return dict(
        n_routed_experts=cfg.num_moe_experts,
        num_experts_per_tok=cfg.moe_router_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        n_shared_experts=1,
        routed_scaling_factor=cfg.moe_router_topk_scaling_factor or 1.0,
        norm_topk_prob=cfg.moe_router_topk > 1,
        n_group=1,
        topk_group=1,
    )


def _check_moe(cfg: ModelConfig) -> None:
    """HF NemotronH's MoE routes by sigmoid scores, choosing with a score-correction bias, and
    always has one shared expert."""
    fixes = [fix for bad, fix in [
        (cfg.moe_router_score_function != "sigmoid", "model.moe_router_score_function=sigmoid"),
        (not cfg.moe_router_enable_expert_bias, "model.moe_router_enable_expert_bias=true"),
        (not cfg.moe_shared_expert_intermediate_size,
         "model.moe_shared_expert_intermediate_size (the shared expert's width)"),
    ] if bad]
    if fixes:
        raise ConversionError("HF NemotronH's MoE routes by sigmoid scores with an expert bias "
                              "and has a shared expert: set " + ", ".join(fixes))


def _check_dt_clamp(cfg: ModelConfig) -> None:
    """HF's one ``time_step_min`` is both the dt clamp and the low end of the dt init."""
    clamp, low = cfg.mamba_dt_clamp_min, cfg.mamba_dt_min
    if clamp not in (0.0, low):
        raise ConversionError(
            f"model.mamba_dt_clamp_min={clamp} differs from model.mamba_dt_min={low}: HF's "
            "time_step_min is both the dt clamp and the low end of the dt init; set "
            f"mamba_dt_clamp_min to 0 or {low} to convert exactly")
    if clamp == 0.0 and low != _DEFAULT_DT_MIN:
        raise ConversionError(
            f"model.mamba_dt_min={low} without a dt clamp: HF's time_step_min is then 0 and "
            f"cannot carry it; set mamba_dt_clamp_min={low} or mamba_dt_min={_DEFAULT_DT_MIN}")


def model_config_from_hf(hf_config, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of an HF ``NemotronHConfig``; ConversionError for what Megatron's
    model cannot reproduce exactly (biases, tied embeddings, other activations, MoE routing
    HF NemotronH does not have, MTP)."""
    _check_hf_config(hf_config)
    fields = dict(
        pattern=hf_config.hybrid_override_pattern,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_config.head_dim,
        mamba_num_heads=hf_config.mamba_num_heads,
        mamba_head_dim=hf_config.mamba_head_dim,
        mamba_state_dim=hf_config.ssm_state_size,
        mamba_num_groups=hf_config.n_groups,
        vocab_size=hf_config.vocab_size,
        seq_length=hf_config.max_position_embeddings,
        norm_eps=hf_config.layer_norm_epsilon,
        mamba_chunk_size=hf_config.chunk_size,
        init_std=hf_config.initializer_range,
        mamba_dt_max=hf_config.time_step_max,
        mamba_dt_clamp_min=hf_config.time_step_min,  # what transformers 5.23 clamps at
    )
    if hf_config.time_step_min > 0:  # 0 (no clamp) leaves the init's low end at its default
        fields["mamba_dt_min"] = hf_config.time_step_min
    if "E" in hf_config.hybrid_override_pattern:
        fields.update(_model_moe_fields(hf_config))
    cfg = ModelConfig(**{**fields, **overrides})
    cfg.validate()
    return cfg


def _model_moe_fields(hf) -> dict:
    """The MoE fields of HF's router (see the module docstring); its GEMM in fp32, as HF's."""
    return dict(
        num_moe_experts=hf.n_routed_experts,
        moe_router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=hf.moe_shared_expert_intermediate_size,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=(None if hf.routed_scaling_factor == 1.0
                                        else hf.routed_scaling_factor),
        moe_router_dtype="fp32",
    )


def _moe_problems(hf) -> list[tuple[bool, str]]:
    """What Megatron's MoE layer cannot reproduce of HF's (only asked with ``E`` layers)."""
    topk = hf.num_experts_per_tok
    return [
        (hf.n_group != 1 or hf.topk_group != 1,
         f"expert groups (n_group={hf.n_group}, topk_group={hf.topk_group}; need 1 and 1)"),
        (hf.moe_latent_size is not None,
         f"moe_latent_size={hf.moe_latent_size} (latent expert projections)"),
        (bool(hf.norm_topk_prob) != (topk > 1),
         f"norm_topk_prob={hf.norm_topk_prob} with num_experts_per_tok={topk} (Megatron's "
         "sigmoid router normalizes the top-k weights exactly when top-k > 1)"),
    ]


def _check_hf_config(hf) -> None:
    problems = [
        (hf.tie_word_embeddings, "tie_word_embeddings=True (Megatron model is untied)"),
        (hf.use_bias or hf.mlp_bias or hf.attention_bias or hf.mamba_proj_bias,
         "linear biases (Megatron's Nemotron-H layers have none)"),
        (not hf.use_conv_bias, "use_conv_bias=False (Megatron's conv1d has a bias)"),
        (hf.conv_kernel != MEGATRON_CONV_KERNEL, f"conv_kernel={hf.conv_kernel} (Megatron: 4)"),
        (hf.mlp_hidden_act != "relu2", f"mlp_hidden_act={hf.mlp_hidden_act!r} (need relu2)"),
        (hf.mamba_hidden_act != "silu", f"mamba_hidden_act={hf.mamba_hidden_act!r} (need silu)"),
        (hf.num_nextn_predict_layers > 0, "multi-token-prediction layers"),
        (hf.layer_norm_epsilon != MEGATRON_GATED_NORM_EPS,
         f"layer_norm_epsilon={hf.layer_norm_epsilon} (Megatron's gated norm uses 1e-5)"),
    ]
    if "E" in hf.hybrid_override_pattern:
        problems += _moe_problems(hf)
    found = [message for bad, message in problems if bad]
    if found:
        raise ConversionError("HF config cannot be converted exactly: " + "; ".join(found))


# ---------------------------------------------------------------------------------------------
# Weights: one table per layer kind, expanded into one entry per Megatron tensor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fused:
    """One Megatron tensor computed from HF tensors (fused, or cast)."""

    mcore: str
    hf: tuple[str, ...]
    fuse: Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]
    split: Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]


@dataclass(frozen=True)
class _LayerMap:
    """Megatron names under ``decoder.layers.{i}.`` <-> HF names under ``layers.{i}.``."""

    renames: Mapping[str, str]
    fused: tuple[_Fused, ...] = ()
    per_expert: Mapping[str, str] = field(default_factory=dict)
    """Renames with an ``{expert}`` field, repeated for every routed expert."""


@dataclass(frozen=True)
class TensorMap:
    """One Megatron tensor (full, TP=1) and the HF tensors it is made of (one unless fused)."""

    mcore: str
    hf: tuple[str, ...]
    fuse: Callable[[list[torch.Tensor]], torch.Tensor]
    """HF tensors, in ``hf`` order -> the Megatron tensor."""
    split: Callable[[torch.Tensor], list[torch.Tensor]]
    """The Megatron tensor -> HF tensors, in ``hf`` order."""

    @property
    def layer(self) -> int | None:
        """The decoder layer this tensor belongs to (None for embedding, final norm, output)."""
        found = re.match(r"decoder\.layers\.(\d+)\.", self.mcore)
        return int(found.group(1)) if found else None


def _qkv_shapes(cfg: ModelConfig) -> tuple[int, list[int]]:
    groups, head_dim = cfg.num_query_groups, cfg.kv_channels
    q_rows = cfg.num_attention_heads // groups * head_dim
    return groups, [q_rows, head_dim, head_dim]


def _fuse_qkv(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """q [heads*d, h], k [groups*d, h], v [groups*d, h] -> rows ``[q_g, k_g, v_g]`` per group."""
    import torch

    groups, _ = _qkv_shapes(cfg)
    per_group = [t.reshape(groups, -1, t.shape[-1]) for t in parts]
    return torch.cat(per_group, dim=1).reshape(-1, parts[0].shape[-1])


def _split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    groups, rows = _qkv_shapes(cfg)
    per_group = fused.reshape(groups, sum(rows), fused.shape[-1]).split(rows, dim=1)
    return [t.reshape(-1, fused.shape[-1]) for t in per_group]


def _only(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def _as_float32(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Megatron-Core's router keeps its expert bias in float32 whatever the model's dtype."""
    import torch

    return parts[0].to(torch.float32)


def _unchanged(tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [tensor]


def _as_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


_MAMBA = _LayerMap(renames={
    "norm.weight": "norm.weight",
    "mixer.in_proj.weight": "mixer.in_proj.weight",  # [z, x, B, C, dt] rows in both
    "mixer.conv1d.weight": "mixer.conv1d.weight",  # [conv_dim, 1, d_conv] in both
    "mixer.conv1d.bias": "mixer.conv1d.bias",
    "mixer.dt_bias": "mixer.dt_bias",
    "mixer.A_log": "mixer.A_log",
    "mixer.D": "mixer.D",
    "mixer.norm.weight": "mixer.norm.weight",  # gated norm, n_groups groups in both
    "mixer.out_proj.weight": "mixer.out_proj.weight",
})
_ATTENTION = _LayerMap(
    renames={
        "input_layernorm.weight": "norm.weight",
        "self_attention.linear_proj.weight": "mixer.o_proj.weight",
    },
    fused=(_Fused(
        mcore="self_attention.linear_qkv.weight",
        hf=("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
        fuse=_fuse_qkv,
        split=_split_qkv,
    ),),
)
_MLP = _LayerMap(renames={
    "pre_mlp_layernorm.weight": "norm.weight",
    "mlp.linear_fc1.weight": "mixer.up_proj.weight",
    "mlp.linear_fc2.weight": "mixer.down_proj.weight",
})
_MOE = _LayerMap(
    renames={
        "pre_mlp_layernorm.weight": "norm.weight",
        "mlp.router.weight": "mixer.gate.weight",
        "mlp.shared_experts.linear_fc1.weight": "mixer.shared_experts.up_proj.weight",
        "mlp.shared_experts.linear_fc2.weight": "mixer.shared_experts.down_proj.weight",
    },
    fused=(_Fused(
        mcore="mlp.router.expert_bias",
        hf=("mixer.gate.e_score_correction_bias",),
        fuse=_as_float32,
        split=_unchanged,
    ),),
    per_expert={  # HF: the published files' names; transformers' modules stack them
        "mlp.experts.local_experts.{expert}.linear_fc1.weight":
            "mixer.experts.{expert}.up_proj.weight",
        "mlp.experts.local_experts.{expert}.linear_fc2.weight":
            "mixer.experts.{expert}.down_proj.weight",
    },
)
LAYER_MAPS: dict[str, _LayerMap] = {"M": _MAMBA, "*": _ATTENTION, "-": _MLP, "E": _MOE}
"""Pattern symbol -> its weight table."""


def weight_map(cfg: ModelConfig, prefix: str = HF_PREFIX) -> list[TensorMap]:
    """Every tensor of ``cfg``'s model (weights and the routers' expert bias) in HF module
    order (embedding, layers, final norm, output layer); ``prefix`` is the HF decoder's
    (``model.`` or ``backbone.``). Routed experts have one HF tensor each, as in the published
    files (:func:`fuse_experts` gives transformers' stacked tensors)."""
    if "E" in cfg.layer_pattern.layers:
        _check_moe(cfg)
    entries = [_renamed("embedding.word_embeddings.weight", f"{prefix}embeddings.weight")]
    for index, symbol in enumerate(cfg.layer_pattern.layers):
        entries += _layer_entries(index, _layer_map(symbol, cfg), prefix, cfg)
    return entries + [_renamed("decoder.final_norm.weight", f"{prefix}norm_f.weight"),
                      _renamed("output_layer.weight", "lm_head.weight")]


def _renamed(mcore: str, hf: str) -> TensorMap:
    return TensorMap(mcore=mcore, hf=(hf,), fuse=_only, split=_as_list)


def _layer_entries(index: int, table: _LayerMap, prefix: str, cfg: ModelConfig) -> list:
    mcore_layer, hf_layer = f"decoder.layers.{index}.", f"{prefix}layers.{index}."
    entries = [_renamed(mcore_layer + mcore, hf_layer + hf) for mcore, hf in table.renames.items()]
    entries += [_renamed(mcore_layer + mcore.format(expert=expert),
                         hf_layer + hf.format(expert=expert))
                for expert in range(cfg.num_moe_experts or 0)
                for mcore, hf in table.per_expert.items()]
    for fused in table.fused:
        entries.append(TensorMap(
            mcore=mcore_layer + fused.mcore, hf=tuple(hf_layer + hf for hf in fused.hf),
            fuse=functools.partial(fused.fuse, cfg=cfg),
            split=functools.partial(fused.split, cfg=cfg)))
    return entries


def _layer_map(symbol: str, cfg: ModelConfig) -> _LayerMap:
    if symbol not in LAYER_MAPS:
        raise ConversionError(f"layer kind {symbol!r} of pattern {cfg.pattern!r} has no HF "
                              f"mapping (known: {', '.join(LAYER_MAPS)})")
    return LAYER_MAPS[symbol]


_EXPERT = re.compile(r"(?P<experts>.+\.mixer\.experts)\.(?P<index>\d+)\."
                     r"(?P<proj>up_proj|down_proj)\.weight")
"""An HF routed expert's tensor as the published files name it."""
_STACKED_EXPERTS = re.compile(r"(?P<experts>.+\.mixer\.experts)\.(?P<proj>up_proj|down_proj)")
"""transformers' 3-D tensor of all of a layer's routed experts, [E, out, in]."""


def stacked_expert(name: str) -> tuple[str, int] | None:
    """transformers' stacked tensor that holds the published per-expert tensor ``name``, and
    its row; None if ``name`` is no routed expert's."""
    found = _EXPERT.fullmatch(name)
    return (f"{found['experts']}.{found['proj']}", int(found["index"])) if found else None


def fuse_experts(hf_state: Mapping[str, torch.Tensor]) -> dict:
    """``hf_state`` with each layer's per-expert ``mixer.experts.{j}.up_proj.weight`` [f, h]
    stacked into transformers' ``mixer.experts.up_proj`` [E, f, h] (``down_proj`` alike)."""
    import torch

    out, stacks = {}, {}
    for name, tensor in hf_state.items():
        found = stacked_expert(name)
        if found is None:
            out[name] = tensor
        else:
            out.setdefault(found[0], None)  # keeps the place of the layer's first expert
            stacks.setdefault(found[0], {})[found[1]] = tensor
    for name, experts in stacks.items():
        out[name] = torch.stack([experts[index] for index in range(len(experts))])
    return out


def unfuse_experts(hf_state: Mapping[str, torch.Tensor]) -> dict:
    """``hf_state`` with transformers' stacked expert tensors split into the published
    per-expert ones (views); the inverse of :func:`fuse_experts`, and a no-op on dicts that
    have none (meta tensors work too)."""
    out = {}
    for name, tensor in hf_state.items():
        found = _STACKED_EXPERTS.fullmatch(name)
        if found is None:
            out[name] = tensor
            continue
        out.update((f"{found['experts']}.{index}.{found['proj']}.weight", row)
                   for index, row in enumerate(tensor.unbind(0)))
    return out


def hf_to_mcore_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict:
    """Megatron-Core (TP=1, PP=1, EP=1) state dict from an HF NemotronH one (``model.`` or
    ``backbone.`` prefix; routed experts stacked or one tensor each). Raises ConversionError on
    missing or unused HF tensors."""
    remaining = unfuse_experts(hf_state)
    out = {}
    for entry in weight_map(cfg, detect_prefix(hf_state)):
        parts = [remaining.pop(name, None) for name in entry.hf]
        complete = all(part is not None for part in parts)
        out[entry.mcore] = entry.fuse(parts) if complete else None
    _check_complete(out, remaining, "HF", "Megatron")
    return out


def mcore_to_hf_state_dict(mcore_state: Mapping[str, torch.Tensor], cfg: ModelConfig, *,
                           prefix: str = HF_PREFIX) -> dict:
    """HF NemotronH state dict from a full Megatron-Core (TP=1, PP=1, EP=1) one: with the
    default prefix that of transformers' modules (routed experts stacked), with ``prefix``
    ``"backbone."`` NVIDIA's published on-disk names (one tensor per expert). Works on any
    per-parameter tensors (e.g. gradients). ``*._extra_state`` entries are ignored."""
    remaining = {k: v for k, v in mcore_state.items() if not k.endswith("._extra_state")}
    out = {}
    for entry in weight_map(cfg, prefix):
        tensor = remaining.pop(entry.mcore, None)
        parts = entry.split(tensor) if tensor is not None else [None] * len(entry.hf)
        out.update(zip(entry.hf, parts))
    _check_complete(out, remaining, "Megatron", "HF")
    return fuse_experts(out) if prefix == HF_PREFIX else out


def detect_prefix(hf_names: Iterable[str]) -> str:
    """The decoder prefix (``model.`` or ``backbone.``) that HF tensor names use."""
    names = list(hf_names)
    found = {p for p in (HF_PREFIX, HF_CHECKPOINT_PREFIX) if any(k.startswith(p) for k in names)}
    if len(found) != 1:
        raise ConversionError(
            f"HF state dict must use exactly one of the prefixes {HF_PREFIX!r} / "
            f"{HF_CHECKPOINT_PREFIX!r} for the decoder, found {sorted(found) or 'neither'}")
    return found.pop()


def _check_complete(out: dict, remaining: dict, source: str, target: str) -> None:
    missing = sorted(name for name, tensor in out.items() if tensor is None)
    if missing or remaining:
        raise ConversionError(
            f"{source} state dict does not match the config: {target} tensors without a source "
            f"{preview(missing)}; unused {source} tensors {preview(sorted(remaining))}")


def preview(names: list[str], limit: int = 6) -> str:
    """``[a, b, ... (n in all)]``: a list short enough for a one-line error."""
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def load_mcore_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a converted state dict into a Megatron ``MambaModel`` (TP=1, PP=1).

    Strict except for Megatron's ``*._extra_state`` entries (Transformer Engine FP8 metadata
    slots, None for local layers), which a converted dict does not carry.
    """
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not re.search(r"\._extra_state$", k)]
    if missing or result.unexpected_keys:
        raise ConversionError(f"state dict does not fit the model: missing {preview(missing)}, "
                              f"unexpected {preview(list(result.unexpected_keys))}")
