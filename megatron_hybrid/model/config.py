"""The model section: the shape of a hybrid model (``model:`` in a recipe).

The hybrid pattern is the single source of depth: there is no ``num_layers`` field;
``ModelConfig.num_layers`` is derived from the pattern.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_hybrid import pattern as pattern_lib
from megatron_hybrid.errors import ConfigError, check_choice

TRANSFORMER_IMPLS = ("transformer_engine", "local")
STABILITY_OPTIONS = ("qk_layernorm", "post_sublayer_norm", "attention_logit_softcap")
"""Model options against high-learning-rate divergence; the local spec builds them."""
LAYER_OVERRIDES = {"-": ("ffn_hidden_size",), "*": ("num_attention_heads", "num_query_groups"),
                   "M": ("mamba_num_heads",), "E": ("moe_ffn_hidden_size",)}
"""Layer symbol -> the sizes ``model.layer_overrides`` may set for one layer of that kind."""


@dataclass(kw_only=True)
class ModelConfig:
    pattern: str
    """Hybrid layer pattern: M Mamba-2, * attention, - MLP, E MoE, H parallel heads (attention
    and Mamba-2 heads side by side, Hymba), | pipeline-stage boundary."""
    hidden_size: int
    """Model width (d_model)."""
    ffn_hidden_size: int
    """MLP inner width (squared-ReLU, no gating)."""
    num_attention_heads: int
    """Query heads of the attention layers."""
    num_query_groups: int
    """Key/value heads (grouped-query attention)."""
    kv_channels: int
    """Attention head dimension."""
    mamba_num_heads: int
    """Mamba-2 heads; d_inner = mamba_num_heads * mamba_head_dim."""
    mamba_head_dim: int
    """Mamba-2 head dimension."""
    mamba_state_dim: int
    """SSM state size (N)."""
    mamba_num_groups: int
    """Groups sharing B and C (like query groups); also the gated-norm groups."""
    vocab_size: int
    """Vocabulary size (Nemotron: 131072)."""
    seq_length: int = 8192
    """Maximum sequence length the model is trained for."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    mamba_chunk_size: int = 128
    """Chunk length of the SSD scan."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear weights."""
    mamba_dt_min: float = 0.001
    """Smallest step size of the initialisation: ``softplus(dt_bias)`` is log-uniform in
    [mamba_dt_min, mamba_dt_max] (HF ``time_step_min``, Megatron-Core ``dt_min``)."""
    mamba_dt_max: float = 0.1
    """Largest step size of the initialisation (HF ``time_step_max``)."""
    mamba_dt_clamp_min: float = 0.0
    """Every Mamba layer computes ``dt = max(softplus(. + dt_bias), mamba_dt_clamp_min)``, in
    training, prefill and decode: HF NemotronH's clamp (transformers 5.23 clamps at
    ``time_step_min``; NVIDIA's published configs give 0.001). 0: no clamp, as Megatron-Core
    0.16.1's own mixer."""
    num_moe_experts: int | None = None
    """Experts of `E` layers (required when the pattern has `E`)."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """Inner width of each expert (defaults to ffn_hidden_size; HF ``moe_intermediate_size``)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Inner width of the shared expert every token passes through beside its routed ones
    (HF ``moe_shared_expert_intermediate_size`` with ``n_shared_experts`` 1); None: none."""
    moe_router_score_function: str = "softmax"
    """softmax | sigmoid: the router's score of each expert. With sigmoid the top-k scores are
    normalized to sum to 1 (topk > 1; HF ``norm_topk_prob: true``), as Megatron-Core does."""
    moe_router_pre_softmax: bool = False
    """softmax only: softmax over all experts before the top-k (probabilities not
    renormalized); otherwise softmax over the top-k logits (normalized)."""
    moe_router_topk_scaling_factor: float | None = None
    """The routed experts' weights are multiplied by it (HF ``routed_scaling_factor``)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing (sigmoid only): a per-expert bias added to the scores for
    the top-k choice alone, moved after each step towards the under-loaded experts."""
    moe_router_bias_update_rate: float = 1e-3
    """How far each step moves the expert bias."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing auxiliary loss (0: none)."""
    moe_router_dtype: str | None = None
    """fp32 | fp64: the router's GEMM and scores in that precision; None: the model's."""
    mtp_num_layers: int = 0
    """Multi-token-prediction layers after the decoder (HF ``num_nextn_predict_layers``).
    Only 0 builds: Megatron-Core 0.16.1's MambaModel has no MTP block (its GPTModel has)."""
    qk_layernorm: bool = False
    """Training stability (arXiv 2410.16682, after Dehghani et al. 2023): an RMSNorm on each
    attention head's queries and keys before their product (Megatron-Core ``qk_layernorm``)."""
    post_sublayer_norm: bool = False
    """Training stability (arXiv 2410.16682: a norm after Proj and FC2): an RMSNorm on the
    output of every attention and dense MLP sublayer before its residual add."""
    attention_logit_softcap: float = 0.0
    """Training stability (Gemma 2's soft-capping, with QK norm in arXiv 2410.16682): the
    attention scores become ``cap * tanh(score / cap)`` before the softmax; 0: none."""
    num_meta_tokens: int = 0
    """Hymba's meta tokens (arXiv 2411.13676): learnable vectors put before every sequence,
    which every position of every layer sees and the loss skips; 0: none. Needs pp = cp = 1,
    no sequence parallel and no packed documents."""
    attention_window: int = 0
    """Sliding-window attention in the parallel-heads ('H') layers (Hymba's local attention):
    each position sees itself, the attention_window - 1 positions before it and the meta
    tokens; 0: the whole causal context. Attention ('*') layers always see it whole."""
    transformer_impl: str = "transformer_engine"
    """transformer_engine | local (Megatron-LM's ``--transformer-impl``), on the cuda backend:
    Megatron-Core's Transformer Engine spec, or its local linears with a torch RMSNorm and SDPA
    attention (the real mamba_ssm kernels either way), which runs without Transformer Engine
    and is the spec ModelOpt converts (prune and distill choose it by themselves). The cpu
    backend has no Transformer Engine and builds local for both values. Checkpoints load
    across the two: they name their parameters alike."""
    layer_overrides: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Heterogeneous blocks (Puzzle, arXiv 2411.19146; Nemotron-H's MiniPuzzle): layer index
    (0-based over the pattern's layers, '|' not counted) -> the sizes that differ there from
    the ones above, by the layer's kind (LAYER_OVERRIDES): ffn_hidden_size for '-',
    num_attention_heads and num_query_groups for '*', mamba_num_heads for 'M',
    moe_ffn_hidden_size for 'E'; e.g. ``{3: {ffn_hidden_size: 256}}``."""

    def __post_init__(self):
        # meta.json (JSON) and dotted CLI keys give the layer indices as text.
        if isinstance(self.layer_overrides, dict):
            self.layer_overrides = {
                int(key) if isinstance(key, str) and key.strip().isdigit() else key: value
                for key, value in self.layer_overrides.items()}

    @property
    def layer_pattern(self) -> pattern_lib.Pattern:
        return pattern_lib.parse(self.pattern)

    @property
    def num_layers(self) -> int:
        return self.layer_pattern.num_layers

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    def for_layer(self, index: int) -> "ModelConfig":
        """This model with layer ``index``'s (0-based) sizes as its own and no overrides:
        what that one layer is built and counted from."""
        return self.replace(**self.layer_overrides.get(index, {}), layer_overrides={})

    @property
    def stability_options(self) -> list[str]:
        """The training-stability options this model turns on, by key."""
        return [name for name in STABILITY_OPTIONS if getattr(self, name)]

    @property
    def needs_transformer_engine(self) -> bool:
        """Whether the cuda backend needs Transformer Engine for this model
        (``backends.install(..., need_transformer_engine=)``)."""
        return self.transformer_impl == "transformer_engine"

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the key) if the shapes cannot build a model."""
        check_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        try:
            layer_pattern = self.layer_pattern
        except pattern_lib.PatternError as err:
            raise ConfigError(f"model.pattern: {err}") from None
        checks = [
            (self.num_attention_heads % self.num_query_groups == 0,
             f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"model.num_query_groups ({self.num_query_groups})"),
            (self.mamba_num_heads % self.mamba_num_groups == 0,
             f"model.mamba_num_heads ({self.mamba_num_heads}) must be a multiple of "
             f"model.mamba_num_groups ({self.mamba_num_groups})"),
        ]
        checks += _dt_checks(self)
        cap = self.attention_logit_softcap
        checks.append((isinstance(cap, (int, float)) and not isinstance(cap, bool)
                       and 0 <= cap < math.inf,
                       f"model.attention_logit_softcap must be a finite number >= 0 (0: none), "
                       f"got {cap!r}"))
        checks.append((self.mtp_num_layers == 0, MTP_UNSUPPORTED.format(self.mtp_num_layers)))
        if layer_pattern.counts.get("E"):
            checks += _moe_checks(self)
        checks += _parallel_heads_checks(self, layer_pattern.counts["H"])
        for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
                     "mamba_num_groups", "vocab_size", "seq_length", "mamba_chunk_size"):
            value = getattr(self, name)
            checks.insert(0, (isinstance(value, int) and value > 0,
                              f"model.{name} must be a positive integer, got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        _check_layer_overrides(self, layer_pattern.layers)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dt_checks(model: ModelConfig) -> list[tuple[bool, str]]:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return [
        (number(model.mamba_dt_min) and number(model.mamba_dt_max)
         and 0 < model.mamba_dt_min <= model.mamba_dt_max,
         f"model.mamba_dt_min ({model.mamba_dt_min!r}) must be > 0 and <= model.mamba_dt_max "
         f"({model.mamba_dt_max!r})"),
        (number(model.mamba_dt_clamp_min) and 0 <= model.mamba_dt_clamp_min < math.inf,
         f"model.mamba_dt_clamp_min must be a finite number >= 0 (0: no clamp), got "
         f"{model.mamba_dt_clamp_min!r}"),
    ]


def _check_layer_overrides(model: ModelConfig, layers: str) -> None:
    """Each of ``model.layer_overrides``: a layer of the pattern, sizes of its kind, and a
    layer that validates with them."""
    overrides = model.layer_overrides
    if not isinstance(overrides, dict):
        raise ConfigError(f"model.layer_overrides: expected a mapping of layer index -> sizes, "
                          f"e.g. {{3: {{ffn_hidden_size: 256}}}}, got {overrides!r}")
    for index, sizes in overrides.items():
        key = f"model.layer_overrides.{index}"
        if not (type(index) is int and 0 <= index < len(layers)):
            raise ConfigError(f"{key}: not a layer of the pattern: give a 0-based index in "
                              f"0..{len(layers) - 1} ('|' not counted)")
        symbol = layers[index]
        allowed = LAYER_OVERRIDES.get(symbol, ())
        if not isinstance(sizes, dict) or not sizes:
            raise ConfigError(f"{key}: expected a mapping of sizes from {list(allowed)}, "
                              f"got {sizes!r}")
        for name, value in sizes.items():
            if name not in allowed:
                raise ConfigError(f"{key}.{name}: layer {index} is "
                                  f"{pattern_lib.LAYER_KINDS.get(symbol, symbol)} ({symbol!r}), "
                                  f"whose per-layer sizes are {list(allowed)}")
            if not (type(value) is int and value > 0):
                raise ConfigError(f"{key}.{name} must be a positive integer, got {value!r}")
        try:
            model.for_layer(index).validate()
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None


def _parallel_heads_checks(model: ModelConfig, layers: int) -> list[tuple[bool, str]]:
    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    attention_width = model.num_attention_heads * model.kv_channels
    return [
        (count(model.num_meta_tokens),
         f"model.num_meta_tokens must be an integer >= 0 (0: none), got "
         f"{model.num_meta_tokens!r}"),
        (count(model.attention_window),
         f"model.attention_window must be an integer >= 0 (0: none), got "
         f"{model.attention_window!r}"),
        (layers or not model.attention_window,
         "model.attention_window applies to parallel-heads ('H') layers and model.pattern has "
         "none: set model.attention_window=0 or add 'H' layers"),
        (not layers or attention_width == model.mamba_d_inner,
         f"parallel-heads ('H') layers average their attention and Mamba outputs, which must "
         f"be as wide: model.num_attention_heads * model.kv_channels ({attention_width}) != "
         f"model.mamba_num_heads * model.mamba_head_dim ({model.mamba_d_inner})"),
    ]


MTP_UNSUPPORTED = (
    "model.mtp_num_layers={} cannot build: Megatron-Core 0.16.1's MambaModel has no "
    "multi-token-prediction block (only its GPTModel has one); set model.mtp_num_layers=0 "
    "(MTP adds an auxiliary loss on later tokens and a draft head for speculative decoding; "
    "the model trains and generates without it)")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_ROUTER_DTYPES = ("fp32", "fp64")


def _moe_checks(model: ModelConfig) -> list[tuple[bool, str]]:
    experts, topk = model.num_moe_experts, model.moe_router_topk
    check_choice("model.moe_router_score_function", model.moe_router_score_function,
                 MOE_SCORE_FUNCTIONS)
    if model.moe_router_dtype is not None:
        check_choice("model.moe_router_dtype", model.moe_router_dtype, MOE_ROUTER_DTYPES)
    scaling = model.moe_router_topk_scaling_factor
    shared = model.moe_shared_expert_intermediate_size
    return [
        (isinstance(experts, int) and experts > 0,
         "model.num_moe_experts must be set when the pattern has 'E' layers"),
        (isinstance(topk, int) and 0 < topk <= (experts or 0),
         f"model.moe_router_topk ({topk!r}) must be between 1 and model.num_moe_experts "
         f"({experts!r})"),
        (not model.moe_router_enable_expert_bias or model.moe_router_score_function == "sigmoid",
         "model.moe_router_enable_expert_bias needs model.moe_router_score_function=sigmoid"),
        (not model.moe_router_pre_softmax or model.moe_router_score_function == "softmax",
         "model.moe_router_pre_softmax applies to softmax scores: set it false with sigmoid"),
        (scaling is None or scaling > 0,
         f"model.moe_router_topk_scaling_factor must be > 0 or null, got {scaling!r}"),
        (shared is None or (isinstance(shared, int) and shared > 0),
         f"model.moe_shared_expert_intermediate_size must be a positive integer or null, got "
         f"{shared!r}"),
        (model.moe_aux_loss_coeff >= 0,
         f"model.moe_aux_loss_coeff must be >= 0, got {model.moe_aux_loss_coeff!r}"),
    ]


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "in_proj", "out_proj")
"""Linears LoRA can adapt: attention QKV and output projection, MLP fc1 and fc2, Mamba in_proj
and out_proj."""
LORA_COLUMN_TARGETS = ("qkv", "fc1", "in_proj")
"""Target kinds whose base is column-parallel (split by output rows over TP); the others are
row-parallel (split by input columns)."""
PEFT_METHODS = ("none", "lora")


@dataclass(kw_only=True)
class PeftConfig:
    """Parameter-efficient fine-tuning (``peft:`` in a recipe): LoRA adapters on the linears of
    ``target_modules``, the base model frozen."""

    method: str = "none"
    """none (full-parameter training) | lora."""
    rank: int = 16
    """LoRA rank r: A is [r, in], B is [out, r]."""
    alpha: float = 32.0
    """The adapter's output is scaled by alpha / rank (PEFT's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's ``lora_dropout``)."""
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: [kind for kind in LORA_TARGETS if kind != "out_proj"])
    """Which linears get adapters, by kind: qkv, proj, fc1, fc2, in_proj, out_proj. Not
    out_proj by default: peft refuses it on HF NemotronH, so it trains and merges here but
    does not export to PEFT."""

    @property
    def enabled(self) -> bool:
        return self.method == "lora"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        check_choice("peft.method", self.method, PEFT_METHODS)
        if not self.enabled:
            return
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        checks = [
            (isinstance(self.rank, int) and self.rank > 0,
             f"peft.rank must be a positive integer, got {self.rank!r}"),
            (self.alpha > 0, f"peft.alpha must be > 0, got {self.alpha!r}"),
            (0 <= self.dropout < 1, f"peft.dropout must be in [0, 1), got {self.dropout!r}"),
            (bool(self.target_modules) and not unknown,
             f"peft.target_modules: unknown kinds {unknown or '(none given)'}; choose from "
             f"{list(LORA_TARGETS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
