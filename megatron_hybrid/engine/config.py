"""The sections of the training loop: batch and length, optimizer, schedule, logging."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.errors import (
    ConfigError,
    batch_message,
    check_choice,
    check_non_negative_int,
    check_positive_int,
)
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.model.precision import PRECISIONS

RECOMPUTE_MODES = ("none", "selective", "full")
SCHEDULER_KINDS = ("wsd", "cosine", "constant")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
PROGRESS_BAR_MODES = ("auto", "on", "off")
FP8_MULTIPLE = 16
"""FP8 GEMMs (Transformer Engine) need every matrix dimension to be a multiple of this."""


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
    """``fp32``, ``bf16`` (mixed precision with fp32 master weights and optimizer states) or a
    Transformer Engine FP8 recipe over bf16 (cuda only): ``fp8-hybrid`` (per-tensor scaling,
    E4M3 forward / E5M2 backward, one bf16 layer at each end), ``fp8-nemotron-h`` (the same
    with two bf16 layers at each end and FP8 weight gather) or ``fp8-nano-v2`` (E4M3
    everywhere, 128x128 / 1x128 blockwise scaling, two bf16 layers at each end, FP8 weight
    gather); see docs/performance.md."""
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
            check_positive_int(f"train.{name}", getattr(self, name))
        for name in ("seq_length", "max_tokens"):
            if getattr(self, name) is not None:
                check_positive_int(f"train.{name}", getattr(self, name))
        check_non_negative_int("train.eval_interval", self.eval_interval)
        if self.eval_interval:
            check_positive_int("train.eval_batches", self.eval_batches)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.recompute", self.recompute, RECOMPUTE_MODES)
        check_non_negative_int("train.max_bad_steps", self.max_bad_steps)
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError(f"train.loss_spike_factor={self.loss_spike_factor} must be > 1 "
                              f"(or null: off)")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(batch_message(self.global_batch_size, self.micro_batch_size))


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
        check_choice("scheduler.kind", self.kind, SCHEDULER_KINDS)
        check_non_negative_int("scheduler.warmup_steps", self.warmup_steps)
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"scheduler.decay_fraction={self.decay_fraction} must be in [0, 1]")
        check_choice("scheduler.wsd_decay_style", self.wsd_decay_style, WSD_DECAY_STYLES)


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory."""
    plot: bool = True
    """Save loss / learning-rate / throughput plots (PNG) to the run directory."""
    progress_bar: str = "auto"
    """``on``, ``off`` or ``auto`` (on when stdout is a terminal)."""

    def validate(self) -> None:
        check_choice("logging.progress_bar", self.progress_bar, PROGRESS_BAR_MODES)
