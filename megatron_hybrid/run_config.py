"""Typed configuration sections. Each field is documented right under it.

The hybrid pattern is the single source of depth: there is no ``num_layers`` field;
``ModelConfig.num_layers`` is derived from the pattern.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_hybrid import pattern as pattern_lib


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


@dataclass(kw_only=True)
class ModelConfig:
    pattern: str
    """Hybrid layer pattern: M Mamba-2, * attention, - MLP, E MoE, | pipeline-stage boundary."""
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
    """Inner width of each expert (defaults to ffn_hidden_size)."""

    @property
    def layer_pattern(self) -> pattern_lib.Pattern:
        return pattern_lib.parse(self.pattern)

    @property
    def num_layers(self) -> int:
        return self.layer_pattern.num_layers

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the key) if the shapes cannot build a model."""
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
        if layer_pattern.counts.get("E"):
            checks.append((self.num_moe_experts is not None and self.num_moe_experts > 0,
                           "model.num_moe_experts must be set when the pattern has 'E' layers"))
        for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
                     "mamba_num_groups", "vocab_size", "seq_length", "mamba_chunk_size"):
            value = getattr(self, name)
            checks.insert(0, (isinstance(value, int) and value > 0,
                              f"model.{name} must be a positive integer, got {value!r}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

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


# ---------------------------------------------------------------------------------------------
# Run sections. Each component receives only its own section; ``RunConfig`` holds them all and
# owns the checks that span sections. The recipe loader (``megatron_hybrid.recipe``) builds
# these from YAML and checks every key and type against the annotations below.

BACKENDS = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp8-hybrid")
RECOMPUTE_MODES = ("none", "selective", "full")
SCHEDULER_KINDS = ("wsd", "cosine", "constant")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
PROGRESS_BAR_MODES = ("auto", "on", "off")
FP8_MULTIPLE = 16
"""FP8 GEMMs (Transformer Engine) need every matrix dimension to be a multiple of this."""

if TYPE_CHECKING:
    from megatron_hybrid.data.datasets import DataConfig
    from megatron_hybrid.data.tokenizer import TokenizerConfig


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: splits attention heads, Mamba heads and MLP widths."""
    pp: int = 1
    """Pipeline-parallel size: splits the pattern's layers into stages (``|`` marks them)."""
    cp: int = 1
    """Context-parallel size: splits each sequence."""
    sequence_parallel: bool = False
    """Shard norms and dropout activations along the sequence across the TP group (needs tp > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (Megatron-Core distributed optimizer)."""
    backend: str = "auto"
    """``cpu`` (gloo, torch kernels), ``cuda`` (NCCL, TE + mamba_ssm) or ``auto`` (cuda if a GPU
    is visible)."""
    timeout_minutes: float = 10.0
    """How long a collective waits for the other ranks before the run fails (a dead or hung
    rank then stops the job instead of hanging it)."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one model replica: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    def check_world_size(self, world_size: int) -> int:
        """The data-parallel size the world size leaves; ConfigError if tp*pp*cp does not
        divide it."""
        if not _is_positive_int(world_size):
            raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
        product = self.model_parallel_size
        if world_size % product:
            divisors = ", ".join(str(d) for d in _divisors(world_size))
            raise ConfigError(
                f"parallel: tp({self.tp}) * pp({self.pp}) * cp({self.cp}) * dp(?) does not "
                f"divide world size {world_size}: use a world size that is a multiple of "
                f"tp * pp * cp = {product} (e.g. {product}, {2 * product}, {3 * product}), or "
                f"choose tp * pp * cp among {divisors} (the divisors of {world_size})")
        return world_size // product

    def validate(self) -> None:
        for name in ("tp", "pp", "cp"):
            _check_positive_int(f"parallel.{name}", getattr(self, name))
        _check_choice("parallel.backend", self.backend, BACKENDS)
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes={self.timeout_minutes} must be > 0")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (tp is 1): "
                              "set parallel.tp=2 or more, or parallel.sequence_parallel=false")


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills
    the gap)."""
    seq_length: int | None = None
    """Tokens per training sequence; None: model.seq_length (may not exceed it)."""
    max_steps: int = 100
    """Optimizer steps to train for."""
    max_tokens: int | None = None
    """Stop once this many tokens are trained on (whichever of max_steps / max_tokens comes
    first); None: no token limit."""
    eval_interval: int = 50
    """Steps between validation passes (0: never)."""
    eval_batches: int = 4
    """Global batches per validation pass."""
    log_interval: int = 10
    """Steps between metric logs."""
    seed: int = 1234
    """Seed of the weight initialisation and the model's random state."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (mixed precision with fp32 master weights) or ``fp8-hybrid``
    (Transformer Engine E4M3 forward / E5M2 backward; cuda only)."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``selective`` (attention core) or ``full`` (every
    layer)."""
    max_bad_steps: int = 10
    """Bad steps tolerated: a NaN/Inf loss or gradient (its update is skipped) or a loss spike.
    One more stops the run with a checkpoint and ``numerics.json``; 0: stop at the first."""
    loss_spike_factor: float | None = None
    """Count a step as bad when its loss exceeds this multiple of the mean of the previous 20
    (its update is already applied: the count only stops a diverging run); None: off."""

    def resolved_seq_length(self, model: ModelConfig) -> int:
        """The sequence length trained on: ``seq_length``, or the model's when None."""
        return model.seq_length if self.seq_length is None else self.seq_length

    def tokens_per_step(self, model: ModelConfig) -> int:
        """Tokens in one global batch."""
        return self.global_batch_size * self.resolved_seq_length(model)

    def total_steps(self, model: ModelConfig) -> int:
        """Steps the run takes: max_steps, or fewer when max_tokens is reached first."""
        if self.max_tokens is None:
            return self.max_steps
        per_step = self.tokens_per_step(model)
        return min(self.max_steps, -(-self.max_tokens // per_step))

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "max_steps", "log_interval"):
            _check_positive_int(f"train.{name}", getattr(self, name))
        for name in ("seq_length", "max_tokens"):
            if getattr(self, name) is not None:
                _check_positive_int(f"train.{name}", getattr(self, name))
        _check_non_negative_int("train.eval_interval", self.eval_interval)
        if self.eval_interval:
            _check_positive_int("train.eval_batches", self.eval_batches)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.recompute", self.recompute, RECOMPUTE_MODES)
        _check_non_negative_int("train.max_bad_steps", self.max_bad_steps)
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError(f"train.loss_spike_factor={self.loss_spike_factor} must be > 1 "
                              f"(or null: off)")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(_batch_message(self.global_batch_size, self.micro_batch_size))


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay; norms and biases are not decayed."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def validate(self) -> None:
        checks = [
            (self.lr > 0, f"optimizer.lr={self.lr} must be > 0"),
            (0 <= self.min_lr <= self.lr,
             f"optimizer.min_lr={self.min_lr} must be between 0 and optimizer.lr={self.lr}"),
            (self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0"),
            (0 <= self.adam_beta1 < 1, f"optimizer.adam_beta1={self.adam_beta1} must be in [0, 1)"),
            (0 <= self.adam_beta2 < 1, f"optimizer.adam_beta2={self.adam_beta2} must be in [0, 1)"),
            (self.adam_eps > 0, f"optimizer.adam_eps={self.adam_eps} must be > 0"),
            (self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0: off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(kw_only=True)
class SchedulerConfig:
    kind: str = "wsd"
    """``wsd`` (warmup, stable at lr, decay to min_lr at the end), ``cosine`` (warmup, cosine
    decay to min_lr) or ``constant`` (warmup, then lr)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to optimizer.lr."""
    decay_fraction: float = 0.2
    """WSD: fraction of the run's steps spent decaying at its end."""
    wsd_decay_style: str = "linear"
    """WSD decay shape: ``linear``, ``cosine``, ``exponential`` or ``minus_sqrt``."""

    def decay_steps(self, total_steps: int) -> int:
        """Steps of decay in a run of ``total_steps``: WSD's tail, cosine's all after warmup."""
        if self.kind == "wsd":
            return round(self.decay_fraction * total_steps)
        if self.kind == "cosine":
            return max(total_steps - self.warmup_steps, 0)
        return 0

    def validate(self) -> None:
        _check_choice("scheduler.kind", self.kind, SCHEDULER_KINDS)
        _check_non_negative_int("scheduler.warmup_steps", self.warmup_steps)
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"scheduler.decay_fraction={self.decay_fraction} must be in [0, 1]")
        _check_choice("scheduler.wsd_decay_style", self.wsd_decay_style, WSD_DECAY_STYLES)


@dataclass(kw_only=True)
class CheckpointConfig:
    save_interval: int | None = None
    """Steps between checkpoints; None: save only at the end."""
    keep_last: int = 2
    """Checkpoints of this run kept on disk (older ones are deleted)."""
    load: str | None = None
    """A checkpoint directory to initialise the weights from (e.g. a previous stage); optimizer
    and data position start fresh."""
    resume: bool = True
    """Resume from this run's own latest checkpoint when there is one (takes precedence over
    ``load``)."""

    def validate(self) -> None:
        if self.save_interval is not None:
            _check_positive_int("checkpoint.save_interval", self.save_interval)
        _check_positive_int("checkpoint.keep_last", self.keep_last)
        if self.load is not None and not self.load:
            raise ConfigError("checkpoint.load is empty: give a checkpoint directory or null")


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""
    plot: bool = True
    """Save loss / learning-rate / throughput plots (PNG) to the run directory."""
    progress_bar: str = "auto"
    """``on``, ``off`` or ``auto`` (on when stdout is a terminal)."""

    def validate(self) -> None:
        _check_choice("logging.progress_bar", self.progress_bar, PROGRESS_BAR_MODES)


PRUNABLE = ("hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim",
            "num_attention_heads", "num_layers")
"""Model sizes Minitron pruning (ModelOpt ``mcore_minitron``) can shrink here."""
GROUPED_HEADS = {"mamba_num_heads": "mamba_num_groups", "num_attention_heads": "num_query_groups"}
"""Head counts that are pruned within their groups, so stay multiples of the group count."""


@dataclass(kw_only=True)
class PruneConfig:
    export_config: dict | None = None
    """Manual mode: the pruned sizes, keys from PRUNABLE (e.g. ``{hidden_size: 4480,
    ffn_hidden_size: 15680, num_layers: 56}``); sizes not given stay as they are."""
    max_params: float | None = None
    """Search mode: a parameter budget; the fitting candidates with the most parameters are
    scored on held-out loss and the best is kept (give this or export_config, not both)."""
    serve_gpu: str | None = None
    """Search mode by memory, instead of max_params: the GPU (a planner name, e.g. a10g) that
    must serve serve_context tokens with the pruned model in bf16; the parameter budget is
    what the planner leaves for weights after the caches and prefill."""
    serve_context: int = 131072
    """Tokens of context the pruned model must serve on serve_gpu."""
    calibration_samples: int = 64
    """Training-split samples whose activations rank neurons, heads and layers."""
    heldout_samples: int = 32
    """Validation-split samples of the held-out loss (before / after, and search scores)."""
    task_data: bool = False
    """Measure the held-out loss (and score search candidates) on the offline task's held-out
    conversations, assistant tokens, one per sequence (the data an aligned teacher was tuned
    on, as distill.task_data) instead of data's validation split; calibration stays on data."""
    hidden_size_divisor: int = 64
    """Pruned hidden_size must be a multiple of this (or stay unchanged)."""
    ffn_hidden_size_divisor: int = 64
    """Pruned ffn_hidden_size must be a multiple of this (or stay unchanged)."""
    mamba_head_dim_divisor: int = 8
    """Pruned mamba_head_dim must be a multiple of this (or stay unchanged)."""
    num_layers_divisor: int = 1
    """Pruned num_layers must be a multiple of this (or stay unchanged)."""
    max_width_pruning: float = 0.4
    """Search mode: the largest fraction of each width's choices the search may cut."""
    max_depth_pruning: float = 0.2
    """Search mode: the largest fraction of the layers the search may drop."""
    top_k: int = 10
    """Search mode: candidates (the largest that fit the budget) scored on held-out loss."""
    skip_hparams: list[str] = field(default_factory=list)
    """Search mode: sizes from PRUNABLE the search leaves unchanged."""

    @property
    def mode(self) -> str | None:
        """``manual`` (export_config), ``search`` (max_params) or None (no pruning asked)."""
        if self.export_config is not None:
            return "manual"
        return "search" if self.max_params is not None or self.serve_gpu is not None else None

    def validate(self) -> None:
        for name in ("calibration_samples", "heldout_samples", "top_k", "hidden_size_divisor",
                     "ffn_hidden_size_divisor", "mamba_head_dim_divisor", "num_layers_divisor"):
            _check_positive_int(f"prune.{name}", getattr(self, name))
        for name in ("max_width_pruning", "max_depth_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"prune.{name}={getattr(self, name)} must be in [0, 1)")
        _check_positive_int("prune.serve_context", self.serve_context)
        given = [name for name in ("export_config", "max_params", "serve_gpu")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"prune: give one of prune.export_config (manual sizes), "
                              f"prune.max_params or prune.serve_gpu (search under a budget), "
                              f"not {' and '.join(given)}")
        if self.serve_gpu is not None:
            from megatron_hybrid.plan import GPUS

            _check_choice("prune.serve_gpu", self.serve_gpu, tuple(GPUS))
        if self.max_params is not None and self.max_params <= 0:
            raise ConfigError(f"prune.max_params={self.max_params} must be > 0")
        for name in [*(self.export_config or {}), *self.skip_hparams]:
            if name not in PRUNABLE:
                key = "export_config" if name in (self.export_config or {}) else "skip_hparams"
                close = difflib.get_close_matches(str(name), PRUNABLE, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ConfigError(f"prune.{key}: {name!r} cannot be pruned: {hint}choose from "
                                  f"{', '.join(PRUNABLE)}")

    def check_against(self, model: ModelConfig) -> None:
        """Refuse an export_config the model cannot be pruned to, naming the allowed values."""
        for name, value in (self.export_config or {}).items():
            current = getattr(model, name)
            step, unit = self._step(name, model)
            fits = value % step == 0 or value == current if _is_positive_int(value) else False
            if not (fits and value <= current):
                raise ConfigError(
                    f"prune.export_config.{name}={value!r} is not a size the model's {current} "
                    f"can be pruned to: choose a multiple of {unit} up to {current}: "
                    f"{_allowed_sizes(step, current)}")

    def _step(self, name: str, model: ModelConfig) -> tuple[int, str]:
        """What a pruned ``name`` must be a multiple of, and the key that sets it."""
        group_key = GROUPED_HEADS.get(name)
        if group_key:
            return getattr(model, group_key), f"model.{group_key} ({getattr(model, group_key)})"
        divisor = getattr(self, f"{name}_divisor", 1)
        return divisor, f"prune.{name}_divisor ({divisor})"


@dataclass(kw_only=True)
class DistillConfig:
    teacher: str | None = None
    """The frozen teacher's checkpoint (a step_* folder; its meta.json gives its model). The
    student starts from checkpoint.load."""
    logits_temperature: float = 1.0
    """Softmax temperature of the logits KL (published Nemotron recipes: 1)."""
    logits_topk: int | None = None
    """KL over the teacher's top-k vocabulary entries only; None: the whole vocabulary."""
    intermediate_pairs: list[list[int]] = field(default_factory=list)
    """``[student_layer, teacher_layer]`` pairs (0-based layer indices) whose output hidden
    states a cosine loss pulls together (projected when the widths differ)."""
    intermediate_weight: float = 1.0
    """Weight of the mean cosine loss of intermediate_pairs."""
    lm_loss_weight: float = 0.0
    """Weight of the student's own next-token loss added to the KD loss (0: pure KD)."""
    task_data: bool = False
    """Distill on the offline task's conversations (assistant tokens, one per sequence; the
    reasoning data the tiny pipeline's teacher was fine-tuned on) instead of ``data``."""

    def validate(self) -> None:
        if self.teacher is not None and not self.teacher:
            raise ConfigError("distill.teacher is empty: give the teacher's checkpoint folder")
        if self.logits_temperature <= 0:
            raise ConfigError(f"distill.logits_temperature={self.logits_temperature} must be > 0")
        if self.logits_topk is not None:
            _check_positive_int("distill.logits_topk", self.logits_topk)
        for name in ("intermediate_weight", "lm_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name}={getattr(self, name)} must be >= 0")
        for pair in self.intermediate_pairs:
            if len(pair) != 2 or min(pair) < 0:
                raise ConfigError(f"distill.intermediate_pairs: {pair!r} must be "
                                  f"[student_layer, teacher_layer] with 0-based indices")

    def check_against(self, student: ModelConfig, teacher: ModelConfig) -> None:
        """Refuse pairs or a top-k that do not fit the two models."""
        if self.logits_topk is not None and self.logits_topk > student.vocab_size:
            raise ConfigError(f"distill.logits_topk={self.logits_topk} exceeds the vocabulary "
                              f"({student.vocab_size}): lower it or set it to null")
        for student_layer, teacher_layer in self.intermediate_pairs:
            for role, index, model in (("student", student_layer, student),
                                       ("teacher", teacher_layer, teacher)):
                if index >= model.num_layers:
                    raise ConfigError(
                        f"distill.intermediate_pairs: {role} layer {index} does not exist: the "
                        f"{role} has layers 0..{model.num_layers - 1}")


@dataclass(kw_only=True)
class SFTConfig:
    train_path: str | None = None
    """JSONL of conversations (``{"messages": [...], "reasoning": "..."}`` per line); None: the
    arithmetic task's training split (``megatron_hybrid/task.py``)."""
    valid_path: str | None = None
    """JSONL of held-out conversations; None: the task's held-out split."""
    pack: bool = True
    """Pack several whole conversations into each sequence (false: one per sequence)."""
    task_samples: int = 32
    """Held-out task problems answered greedily, each with /think and with /no_think, for
    the task accuracy at the start and the end (0: not measured, e.g. for other data)."""
    max_new_tokens: int = 32
    """Decoding of an answer stops at ``<|im_end|>`` or after this many tokens."""

    def validate(self) -> None:
        from megatron_hybrid import task

        for name in ("train_path", "valid_path"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"sft.{name} is empty: give a JSONL file or null for the "
                                  f"default set")
        if not 0 <= self.task_samples <= task.HELDOUT:
            raise ConfigError(f"sft.task_samples={self.task_samples} must be between 0 and "
                              f"{task.HELDOUT} (the held-out problems)")
        if self.max_new_tokens < 4:
            raise ConfigError(f"sft.max_new_tokens={self.max_new_tokens} must be >= 4 "
                              f"(<think>, </think>, an answer, <|im_end|>)")


@dataclass(kw_only=True)
class DPOConfig:
    beta: float = 0.1
    """Strength of the pull towards the reference (the implicit reward's scale)."""
    sft_loss_weight: float = 0.0
    """Weight of an SFT term added per pair: the chosen response's mean per-token negative
    log-likelihood (NeMo-Aligner's ``sft_loss_weight``; RPO). It keeps DPO from lowering the
    chosen response's likelihood along with the rejected one's."""
    train_path: str | None = None
    """JSONL of pairs (``{"prompt": [...], "chosen": ..., "rejected": ...}`` per line); None:
    the arithmetic task's training split (right vs slipped answers)."""
    valid_path: str | None = None
    """JSONL of held-out pairs; None: the task's held-out split."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0")
        if self.sft_loss_weight < 0:
            raise ConfigError(f"dpo.sft_loss_weight={self.sft_loss_weight} must be >= 0 "
                              f"(0: DPO alone)")
        for name in ("train_path", "valid_path"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"dpo.{name} is empty: give a JSONL file or null for the "
                                  f"default set")


def default_data_config() -> DataConfig:
    from megatron_hybrid.data.datasets import DataConfig

    return DataConfig()


def default_tokenizer_config() -> TokenizerConfig:
    from megatron_hybrid.data.tokenizer import TokenizerConfig

    return TokenizerConfig()


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name: names the output directory and the stage in a pipeline."""
    output_dir: str = "runs/{name}"
    """Directory of checkpoints, logs and the resolved config; ``{name}`` is replaced by name."""
    model: ModelConfig
    """Model shape (``flavor: NAME`` in a recipe gives the base values)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout and backend."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes, length of the run, evaluation, precision."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW hyper-parameters."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    data: DataConfig = field(default_factory=default_data_config)
    """Training and validation data."""
    tokenizer: TokenizerConfig = field(default_factory=default_tokenizer_config)
    """Tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, loading and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric outputs."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """The prune stage: target sizes or a budget, calibration and held-out data."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distill stage: teacher checkpoint and the KD loss."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """The SFT stage: chat data, packing, the reasoning-toggle probe."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """The DPO stage: preference pairs and beta."""

    @property
    def resolved_output_dir(self) -> str:
        """``output_dir`` with ``{name}`` filled in."""
        try:
            return self.output_dir.format(name=self.name)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"output_dir={self.output_dir!r}: only {{name}} may be "
                              f"substituted ({type(err).__name__}: {err})") from None

    @property
    def seq_length(self) -> int:
        """The sequence length trained on."""
        return self.train.resolved_seq_length(self.model)

    @property
    def total_steps(self) -> int:
        """Steps the run takes (max_steps, or fewer when max_tokens is reached first)."""
        return self.train.total_steps(self.model)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError (one line naming the key and the fix) if the sections do not fit
        together; with ``world_size`` also check the data-parallel size it implies."""
        for section in (self.model, self.parallel, self.train, self.optimizer, self.scheduler,
                        self.data, self.tokenizer, self.checkpoint, self.logging, self.prune,
                        self.distill, self.sft, self.dpo):
            section.validate()
        self.prune.check_against(self.model)
        self.resolved_output_dir  # noqa: B018  (raises on a bad placeholder)
        self._check_seq_length()
        self._check_batch(world_size)
        self._check_pipeline()
        self._check_tensor_parallel()
        self._check_context_parallel()
        self._check_schedule()
        self._check_vocab()
        if self.train.precision == "fp8-hybrid":
            self._check_fp8_shapes()
        if self.parallel.backend != "auto":
            self.validate_for_backend(self.parallel.backend)

    def validate_for_backend(self, backend: str) -> None:
        """Refuse what the resolved backend (``cpu`` or ``cuda``) cannot run."""
        _check_choice("backend", backend, ("cpu", "cuda"))
        if backend == "cpu" and self.train.precision != "fp32":
            raise ConfigError(
                f"train.precision={self.train.precision} is not supported on the cpu backend: "
                f"set train.precision=fp32 (bf16 and fp8-hybrid need parallel.backend=cuda)")

    def _seq_key(self) -> str:
        return "model.seq_length" if self.train.seq_length is None else "train.seq_length"

    def _check_seq_length(self) -> None:
        if self.seq_length > self.model.seq_length:
            raise ConfigError(
                f"train.seq_length ({self.seq_length}) exceeds model.seq_length "
                f"({self.model.seq_length}): lower train.seq_length or raise model.seq_length")

    def _check_batch(self, world_size: int | None) -> None:
        if world_size is None:
            return
        dp = self.parallel.check_world_size(world_size)
        micro, global_ = self.train.micro_batch_size, self.train.global_batch_size
        if global_ % (micro * dp):
            raise ConfigError(_batch_message(global_, micro, dp))

    def _check_pipeline(self) -> None:
        try:
            self.model.layer_pattern.stages(self.parallel.pp)
        except pattern_lib.PatternError as err:
            raise ConfigError(f"parallel.pp: {err}") from None

    def _check_tensor_parallel(self) -> None:
        tp = self.parallel.tp
        names = ("num_attention_heads", "num_query_groups", "mamba_num_heads", "mamba_num_groups")
        values = [getattr(self.model, name) for name in names]
        for name, value in zip(names, values):
            if value % tp:
                working = ", ".join(str(d) for d in _divisors(math.gcd(*values)))
                raise ConfigError(
                    f"parallel.tp={tp} does not divide model.{name} ({value}): choose "
                    f"parallel.tp from {working} (divisors of the attention and Mamba head and "
                    f"group counts)")
        if self.parallel.sequence_parallel and self.seq_length % (tp * self.parallel.cp):
            raise ConfigError(
                f"parallel.sequence_parallel=true needs the sequence length ({self.seq_length}, "
                f"{self._seq_key()}) divisible by parallel.tp * parallel.cp = "
                f"{tp * self.parallel.cp}")

    def _check_context_parallel(self) -> None:
        cp, tp = self.parallel.cp, self.parallel.tp
        if cp == 1:
            return
        if self.seq_length % (2 * cp):
            working = [c for c in range(1, self.seq_length // 2 + 1)
                       if self.seq_length % (2 * c) == 0]
            raise ConfigError(
                f"parallel.cp={cp} needs the sequence length ({self.seq_length}, "
                f"{self._seq_key()}) divisible by 2 * cp = {2 * cp} (each rank takes two "
                f"balanced chunks): choose parallel.cp from {', '.join(map(str, working[:8]))}")
        if not self.model.layer_pattern.counts["M"]:
            return
        heads, groups = self.model.mamba_num_heads // tp, self.model.mamba_num_groups // tp
        if heads % cp:
            raise ConfigError(
                f"parallel.cp={cp} must divide the Mamba heads per tensor-parallel rank "
                f"(model.mamba_num_heads / parallel.tp = {heads})")
        if (cp % groups) if groups < cp else (groups % cp):
            raise ConfigError(
                f"parallel.cp={cp} and the Mamba groups per tensor-parallel rank "
                f"(model.mamba_num_groups / parallel.tp = {groups}) must divide one another")

    def _check_schedule(self) -> None:
        scheduler, steps = self.scheduler, self.total_steps
        decay = scheduler.decay_steps(steps) if scheduler.kind == "wsd" else 0
        limit = {"wsd": steps - decay, "cosine": steps - 1}.get(scheduler.kind, steps)
        if scheduler.warmup_steps <= limit:
            return
        decay_text = (f" + WSD decay (scheduler.decay_fraction {scheduler.decay_fraction} of "
                      f"{steps} steps = {decay})" if scheduler.kind == "wsd" else "")
        raise ConfigError(
            f"scheduler.warmup_steps ({scheduler.warmup_steps}){decay_text} does not fit the "
            f"run's {steps} steps: set scheduler.warmup_steps={max(limit, 0)} or less, or "
            f"raise train.max_steps")

    def _check_vocab(self) -> None:
        tokenizer_vocab = getattr(self.tokenizer, "vocab_size", None)
        if (getattr(self.tokenizer, "kind", None) == "default-bpe"
                and tokenizer_vocab is not None and tokenizer_vocab > self.model.vocab_size):
            raise ConfigError(
                f"tokenizer.vocab_size ({tokenizer_vocab}) exceeds model.vocab_size "
                f"({self.model.vocab_size}): the tokenizer's ids must fit the embedding; set "
                f"tokenizer.vocab_size={self.model.vocab_size}")

    def _check_fp8_shapes(self) -> None:
        model = self.model
        in_proj = (2 * model.mamba_d_inner + 2 * model.mamba_num_groups * model.mamba_state_dim
                   + model.mamba_num_heads)
        dims = [(self._seq_key(), self.seq_length), ("model.hidden_size", model.hidden_size),
                ("model.ffn_hidden_size", model.ffn_hidden_size)]
        if model.layer_pattern.counts["M"]:
            dims.append(("the Mamba in_proj width 2 * d_inner + 2 * mamba_num_groups * "
                         "mamba_state_dim + mamba_num_heads", in_proj))
        for key, value in dims:
            if value % FP8_MULTIPLE:
                raise ConfigError(
                    f"train.precision=fp8-hybrid needs {key} ({value}) to be a multiple of "
                    f"{FP8_MULTIPLE}: change it or use train.precision=bf16")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_int(key: str, value) -> None:
    if not _is_positive_int(value):
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def _check_non_negative_int(key: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{key}={value!r} must be an integer >= 0")


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{key}={value!r}: {hint}choose one of {', '.join(choices)}")


def _allowed_sizes(step: int, maximum: int) -> str:
    """The multiples of ``step`` up to ``maximum`` (and ``maximum``), shortened when long."""
    sizes = sorted({*range(step, maximum + 1, step), maximum})
    shown = sizes if len(sizes) <= 8 else [*sizes[:3], "...", *sizes[-2:]]
    return ", ".join(map(str, shown))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _batch_message(global_batch: int, micro_batch: int, dp: int | None = None) -> str:
    unit = micro_batch * (dp or 1)
    factor = (f"train.micro_batch_size ({micro_batch})" if dp is None else
              f"train.micro_batch_size ({micro_batch}) * dp ({dp}) = {unit}")
    below, above = global_batch // unit * unit, (global_batch // unit + 1) * unit
    examples = f"{below} or {above}" if below else f"{above}"
    smaller = [m for m in range(micro_batch - 1, 0, -1) if global_batch % (m * (dp or 1)) == 0]
    alternative = f", or train.micro_batch_size={smaller[0]}" if smaller else ""
    return (f"train.global_batch_size ({global_batch}) must be a multiple of {factor}: "
            f"e.g. train.global_batch_size={examples}{alternative}")
