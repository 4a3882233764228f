"""``RunConfig``: every section of a run, and the checks that span sections.

Each section lives with its area (``model.config``, ``parallel.config``, ``engine.config``,
``checkpoint.config``, ``data``, ``stages.config``); this module, at the composition root with
the recipe loader (``recipe``), holds them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_hybrid import pattern as pattern_lib
from megatron_hybrid.checkpoint.config import CheckpointConfig
from megatron_hybrid.engine.config import (
    FP8_MULTIPLE,
    LoggingConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)
from megatron_hybrid.errors import ConfigError, batch_message, check_choice, divisors
from megatron_hybrid.model.config import ModelConfig, PeftConfig
from megatron_hybrid.model.precision import fp8_recipe
from megatron_hybrid.parallel.config import ParallelConfig
from megatron_hybrid.quantization.config import QuantConfig
from megatron_hybrid.stages.config import (
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    PruneConfig,
    RewardModelConfig,
    SFTConfig,
)

if TYPE_CHECKING:
    from megatron_hybrid.data.datasets import DataConfig
    from megatron_hybrid.data.tokenizer import TokenizerConfig


def default_data_config() -> DataConfig:
    from megatron_hybrid.data.datasets import DataConfig

    return DataConfig()


def default_tokenizer_config() -> TokenizerConfig:
    from megatron_hybrid.data.tokenizer import TokenizerConfig

    return TokenizerConfig()


def _tensor_parallel_problem(model: ModelConfig, tp: int) -> str | None:
    """Why ``tp`` tensor-parallel ranks cannot split ``model``'s layers (None: they can).
    Beyond ``num_query_groups`` ranks Megatron-Core gives each rank a replica of one KV group:
    the fused QKV projection's rows are still split evenly, and each rank all-gathers their
    output and keeps its group's K/V and its share of that group's queries
    (transformer/attention.py:289-303, 1397-1416)."""
    for name in ("num_attention_heads", "mamba_num_heads", "mamba_num_groups"):
        if getattr(model, name) % tp:
            return f"does not divide model.{name} ({getattr(model, name)})"
    groups = model.num_query_groups
    if groups % tp and tp % groups:
        return f"neither divides nor is a multiple of model.num_query_groups ({groups})"
    rows = (model.num_attention_heads + 2 * groups) * model.kv_channels
    if rows % tp:
        return (f"does not divide the {rows} rows of the fused QKV projection "
                f"((num_attention_heads + 2 * num_query_groups) * kv_channels)")
    return None


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
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The GRPO stage: rollouts, rewards, the clipped objective and the KL penalty."""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """The reward-model stage: a scalar (or per-attribute) head and its loss."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA adapters (SFT, DPO): rank, alpha, dropout, target linears; the base frozen."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Quantization: the format SFT and distill train fake-quantized in (QAT, QAD), and what a
    pipeline's quantize stage measures, saves and exports."""

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
                        self.distill, self.sft, self.dpo, self.grpo, self.reward_model, self.peft,
                        self.quant):
            section.validate()
        self.prune.check_against(self.model)
        self.resolved_output_dir  # noqa: B018  (raises on a bad placeholder)
        self._check_seq_length()
        self._check_batch(world_size)
        self._check_pipeline()
        self._check_tensor_parallel()
        self._check_context_parallel()
        self._check_expert_parallel()
        self._check_schedule()
        self._check_vocab()
        self._check_peft()
        if fp8_recipe(self.train.precision) is not None:
            self._check_fp8()
            if self.model.transformer_impl == "local":
                raise ConfigError(f"train.precision={self.train.precision} runs its matmuls in "
                                  f"Transformer Engine, and model.transformer_impl=local has "
                                  f"none (its linears would compute in bf16): set "
                                  f"model.transformer_impl=transformer_engine or "
                                  f"train.precision=bf16")
        if self.parallel.tp_comm_overlap and self.model.transformer_impl == "local":
            raise ConfigError("parallel.tp_comm_overlap=true needs Transformer Engine's "
                              "userbuffers, which model.transformer_impl=local does not use: "
                              "set parallel.tp_comm_overlap=false")
        if self.parallel.backend != "auto":
            self.validate_for_backend(self.parallel.backend)

    def validate_for_backend(self, backend: str) -> None:
        """Refuse what the resolved backend (``cpu`` or ``cuda``) cannot run."""
        check_choice("backend", backend, ("cpu", "cuda"))
        if backend == "cpu" and self.train.precision != "fp32":
            raise ConfigError(
                f"train.precision={self.train.precision} is not supported on the cpu backend: "
                f"set train.precision=fp32 (bf16 and FP8 need parallel.backend=cuda)")
        if backend == "cpu" and self.parallel.tp_comm_overlap:
            raise ConfigError("parallel.tp_comm_overlap=true needs parallel.backend=cuda: set "
                              "parallel.tp_comm_overlap=false")

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
            raise ConfigError(batch_message(global_, micro, dp))

    def _check_pipeline(self) -> None:
        try:
            self.model.layer_pattern.stages(self.parallel.pp)
        except pattern_lib.PatternError as err:
            raise ConfigError(f"parallel.pp: {err}") from None

    def _check_tensor_parallel(self) -> None:
        tp = self.parallel.tp
        problem = _tensor_parallel_problem(self.model, tp)
        if problem:
            working = ", ".join(str(t) for t in divisors(self.model.num_attention_heads)
                                if _tensor_parallel_problem(self.model, t) is None)
            raise ConfigError(
                f"parallel.tp={tp} {problem}: choose parallel.tp from {working} (tp must "
                f"divide the attention heads and the Mamba heads and groups, and divide or be "
                f"a multiple of the KV groups)")
        for layer in sorted(self.model.layer_overrides):  # heterogeneous blocks' own sizes
            problem = _tensor_parallel_problem(self.model.for_layer(layer), tp)
            if problem:
                raise ConfigError(f"parallel.tp={tp} {problem.replace('model.', 'the ')} of "
                                  f"layer {layer} (model.layer_overrides.{layer}): choose "
                                  f"parallel.tp or that layer's sizes so that one divides the "
                                  f"other")
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
        counts = self.model.layer_pattern.counts
        if not counts["M"] + counts["H"]:  # no Mamba heads to split
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

    def _check_expert_parallel(self) -> None:
        ep, etp, model = self.parallel.ep, self.parallel.expert_tp, self.model
        if (model.layer_pattern.counts["E"] and self.parallel.tp > 1
                and not self.parallel.sequence_parallel):
            # Megatron-Core's MoE layer raises this at the first training forward otherwise.
            raise ConfigError(f"MoE layers at parallel.tp={self.parallel.tp} need sequence "
                              "parallelism (Megatron-Core's MoE layer): set "
                              "parallel.sequence_parallel=true")
        if ep == 1 and etp == 1:
            return
        if not model.layer_pattern.counts["E"]:
            if ep > 1:
                raise ConfigError(f"parallel.ep={ep} splits MoE experts and model.pattern has no "
                                  f"'E' layers: set parallel.ep=1, or add 'E' layers")
            return
        if model.num_moe_experts % ep:
            raise ConfigError(
                f"parallel.ep={ep} does not divide model.num_moe_experts "
                f"({model.num_moe_experts}): choose parallel.ep from "
                f"{', '.join(map(str, divisors(model.num_moe_experts)))}")
        width = model.moe_ffn_hidden_size or model.ffn_hidden_size
        if width % etp:
            raise ConfigError(
                f"the expert tensor-parallel size ({etp}, parallel.etp or else parallel.tp) "
                f"does not divide the expert width ({width}, model.moe_ffn_hidden_size): set "
                f"parallel.etp from {', '.join(map(str, divisors(width)[:8]))}")

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

    def _check_peft(self) -> None:
        # Full recompute checkpoints each layer from its input, which a frozen base never
        # makes require grad: the adapters inside would get no gradient.
        if self.peft.enabled and self.train.recompute == "full":
            raise ConfigError("peft.method=lora trains adapters inside frozen layers, which "
                              "train.recompute=full cannot recompute: set train.recompute to "
                              "selective or none")

    def _check_vocab(self) -> None:
        tokenizer_vocab = getattr(self.tokenizer, "vocab_size", None)
        if (getattr(self.tokenizer, "kind", None) == "default-bpe"
                and tokenizer_vocab is not None and tokenizer_vocab > self.model.vocab_size):
            raise ConfigError(
                f"tokenizer.vocab_size ({tokenizer_vocab}) exceeds model.vocab_size "
                f"({self.model.vocab_size}): the tokenizer's ids must fit the embedding; set "
                f"tokenizer.vocab_size={self.model.vocab_size}")

    def _check_fp8(self) -> None:
        keeps_fp8_weights = fp8_recipe(self.train.precision).param_gather
        if keeps_fp8_weights and not self.parallel.distributed_optimizer:
            raise ConfigError(
                f"train.precision={self.train.precision} keeps FP8 weights, which Megatron-Core "
                f"gathers through the distributed optimizer: set "
                f"parallel.distributed_optimizer=true")
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
                    f"train.precision={self.train.precision} needs {key} ({value}) to be a "
                    f"multiple of {FP8_MULTIPLE}: change it or use train.precision=bf16")
