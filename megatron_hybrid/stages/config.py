"""The sections of the stages after pretraining: prune, distill, SFT, DPO."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from megatron_hybrid.errors import (
    ConfigError,
    allowed_sizes,
    check_choice,
    check_positive_int,
    is_positive_int,
)
from megatron_hybrid.model.config import ModelConfig

MOE_PRUNABLE = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
"""MoE sizes (models with ``E`` layers): experts ranked by their routed activations, expert
and shared-expert FFN neurons as the dense FFN's."""
PRUNABLE = ("hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim",
            "num_attention_heads", "num_layers", *MOE_PRUNABLE)
"""Model sizes Minitron pruning (ModelOpt ``mcore_minitron``) can shrink here."""
GROUPED_HEADS = {"mamba_num_heads": "mamba_num_groups", "num_attention_heads": "num_query_groups"}
"""Head counts that are pruned within their groups, so stay multiples of the group count."""
SHARED_DIVISORS = {"moe_ffn_hidden_size": "ffn_hidden_size",
                   "moe_shared_expert_intermediate_size": "ffn_hidden_size"}
"""Sizes ModelOpt rounds with another size's divisor (its FFN divisor covers every FFN)."""


@dataclass(kw_only=True)
class PruneConfig:
    export_config: dict | None = None
    """Manual mode: the pruned sizes, keys from PRUNABLE (e.g. ``{hidden_size: 4480,
    ffn_hidden_size: 15680, num_layers: 56}``); sizes not given stay as they are."""
    drop_layers: list[int] | None = None
    """Manual mode: the layers (0-based indices) depth pruning drops, in place of the ones
    ModelOpt ranks least important, e.g. to reach a published pattern; the depth follows
    from them, so export_config leaves num_layers out."""
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
    num_moe_experts_divisor: int = 8
    """Pruned num_moe_experts must be a multiple of this (or stay unchanged); ModelOpt's
    default. Expert and shared-expert widths use ffn_hidden_size_divisor."""
    max_width_pruning: float = 0.4
    """Search mode: the largest fraction of each width's choices the search may cut."""
    max_depth_pruning: float = 0.2
    """Search mode: the largest fraction of the layers the search may drop."""
    top_k: int = 10
    """Search mode: candidates (the largest that fit the budget) scored on held-out loss."""
    skip_hparams: list[str] = field(default_factory=list)
    """Search mode: sizes from PRUNABLE the search leaves unchanged."""
    per_layer_ffn: bool = False
    """Manual mode with export_config.ffn_hidden_size: each MLP layer gets its own width
    (heterogeneous blocks, written to model.layer_overrides), the uniform target's channels
    shared out over the layers by a global ranking of Minitron's importance; the same
    parameters as the uniform prune (docs/compression.md)."""

    @property
    def mode(self) -> str | None:
        """``manual`` (export_config and/or drop_layers), ``search`` (max_params or
        serve_gpu) or None (no pruning asked)."""
        if self.export_config is not None or self.drop_layers is not None:
            return "manual"
        return "search" if self.max_params is not None or self.serve_gpu is not None else None

    def validate(self) -> None:
        for name in ("calibration_samples", "heldout_samples", "top_k", "hidden_size_divisor",
                     "ffn_hidden_size_divisor", "mamba_head_dim_divisor", "num_layers_divisor",
                     "num_moe_experts_divisor"):
            check_positive_int(f"prune.{name}", getattr(self, name))
        for name in ("max_width_pruning", "max_depth_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"prune.{name}={getattr(self, name)} must be in [0, 1)")
        check_positive_int("prune.serve_context", self.serve_context)
        given = [name for name in ("export_config", "max_params", "serve_gpu")
                 if getattr(self, name) is not None]
        if self.export_config is None and self.drop_layers is not None:
            given.insert(0, "drop_layers")
        if len(given) > 1:
            raise ConfigError(f"prune: give one of prune.export_config and/or "
                              f"prune.drop_layers (manual sizes and layers), "
                              f"prune.max_params or prune.serve_gpu (search under a budget), "
                              f"not {' and '.join(given)}")
        if self.serve_gpu is not None:
            from megatron_hybrid.planning.planner import GPUS

            check_choice("prune.serve_gpu", self.serve_gpu, tuple(GPUS))
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
        """Refuse an export_config or drop_layers the model cannot be pruned to, naming the
        allowed values."""
        if self.drop_layers is not None:
            self._check_drop_layers(model)
        for name, value in (self.export_config or {}).items():
            current = getattr(model, name)
            if name in MOE_PRUNABLE and current is None:
                raise ConfigError(f"prune.export_config.{name}: the model has no "
                                  f"{'MoE layers' if 'E' not in model.pattern else name}: "
                                  "remove the key")
            if name == "num_moe_experts" and is_positive_int(value) and value < \
                    model.moe_router_topk:
                raise ConfigError(f"prune.export_config.num_moe_experts={value} is fewer than "
                                  f"the {model.moe_router_topk} experts each token is routed "
                                  "to (model.moe_router_topk): keep at least that many")
            step, unit = self._step(name, model)
            fits = value % step == 0 or value == current if is_positive_int(value) else False
            if not (fits and value <= current):
                raise ConfigError(
                    f"prune.export_config.{name}={value!r} is not a size the model's {current} "
                    f"can be pruned to: choose a multiple of {unit} up to {current}: "
                    f"{allowed_sizes(step, current)}")

    def _check_drop_layers(self, model: ModelConfig) -> None:
        layers = self.drop_layers
        if "num_layers" in (self.export_config or {}):
            raise ConfigError("prune.drop_layers sets the depth: remove "
                              "prune.export_config.num_layers")
        if not (isinstance(layers, list) and all(type(i) is int and i >= 0 for i in layers)
                and len(set(layers)) == len(layers) < model.num_layers
                and max(layers, default=0) < model.num_layers):
            raise ConfigError(f"prune.drop_layers={layers!r}: give distinct 0-based layer "
                              f"indices below the model's {model.num_layers} layers, not all")

    def _step(self, name: str, model: ModelConfig) -> tuple[int, str]:
        """What a pruned ``name`` must be a multiple of, and the key that sets it."""
        group_key = GROUPED_HEADS.get(name)
        if group_key:
            return getattr(model, group_key), f"model.{group_key} ({getattr(model, group_key)})"
        name = SHARED_DIVISORS.get(name, name)
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
            check_positive_int("distill.logits_topk", self.logits_topk)
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
    arithmetic task's training split (``megatron_hybrid/stages/task.py``)."""
    valid_path: str | None = None
    """JSONL of held-out conversations; None: the task's held-out split."""
    pack: bool = True
    """Pack several whole conversations into each sequence (false: one per sequence)."""
    task_samples: int = 32
    """Held-out task problems answered greedily, each with /think and with /no_think, for
    the task accuracy at the start and the end (0: not measured, e.g. for other data)."""
    max_new_tokens: int = 32
    """Decoding of an answer stops at ``<SPECIAL_12>`` (the end of turn) or after this many
    tokens."""

    def validate(self) -> None:
        from megatron_hybrid.stages import task

        for name in ("train_path", "valid_path"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"sft.{name} is empty: give a JSONL file or null for the "
                                  f"default set")
        if not 0 <= self.task_samples <= task.HELDOUT:
            raise ConfigError(f"sft.task_samples={self.task_samples} must be between 0 and "
                              f"{task.HELDOUT} (the held-out problems)")
        if self.max_new_tokens < 4:
            raise ConfigError(f"sft.max_new_tokens={self.max_new_tokens} must be >= 4 "
                              f"(</think>, an answer, a newline, <SPECIAL_12>)")


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


DEFAULT_REWARDS = {"megatron_hybrid.stages.rewards:arithmetic_answer": 1.0,
                   "megatron_hybrid.stages.rewards:reasoning_format": 0.2}
"""The arithmetic task's checkers and their weights."""


@dataclass(kw_only=True)
class GRPOConfig:
    group_size: int = 8
    """Completions sampled per prompt; advantages are normalized within each group."""
    rollout_batch: int = 4
    """Prompts per step (their completions, rollout_batch * group_size, are one global
    batch: train.global_batch_size must equal it)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the policy's log-probabilities are at 1)."""
    max_new_tokens: int = 32
    """Completions end at the end of turn (``<SPECIAL_12>``) or after this many tokens."""
    clip_range: float = 0.2
    """The policy ratio is clipped to [1 - clip_range, 1 + clip_range] (PPO's epsilon)."""
    kl_coef: float = 0.01
    """Weight of the per-token KL penalty to the frozen reference (k3 estimator; 0: none)."""
    updates_per_rollout: int = 1
    """Optimizer steps on each batch of rollouts; after the first the batch is off-policy and
    the clip bounds the ratio."""
    rewards: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REWARDS))
    """Verifiable checkers, ``module:function`` -> weight; a rollout's reward is the weighted
    sum (``stages/rewards.py``)."""
    reward_model: str | None = None
    """A reward-model checkpoint (``megatron-hybrid reward-model``, one score) whose score of
    each prompt and completion is added to the checkers' reward with weight
    reward_model_weight (at parallel.tp = pp = 1); None: checkers only."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score."""
    task_samples: int = 32
    """Held-out task problems answered greedily (with /think and /no_think) before and after
    RL for the report's accuracy (0: not measured)."""
    train_problems: int = 0
    """Rollout prompts come from the first this many training problems of the task, each with
    /think and /no_think (0: all of them)."""

    def validate(self) -> None:
        from megatron_hybrid.stages import task

        for name in ("group_size", "rollout_batch", "max_new_tokens", "updates_per_rollout"):
            check_positive_int(f"grpo.{name}", getattr(self, name))
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size={self.group_size}: a group needs at least 2 "
                              f"completions to normalize their rewards; set grpo.group_size=2 "
                              f"or more")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature={self.temperature} must be > 0 (rollouts "
                              f"sample; 1.0 keeps the policy's distribution)")
        if not 0 < self.clip_range < 1:
            raise ConfigError(f"grpo.clip_range={self.clip_range} must be in (0, 1) (0.2 is "
                              f"usual)")
        if self.kl_coef < 0:
            raise ConfigError(f"grpo.kl_coef={self.kl_coef} must be >= 0 (0: no KL penalty)")
        if not self.rewards and self.reward_model is None:
            raise ConfigError("grpo.rewards is empty and grpo.reward_model is null: name a "
                              "checker (module:function) or a reward-model checkpoint")
        if self.reward_model is not None and not self.reward_model:
            raise ConfigError("grpo.reward_model is empty: give a reward-model checkpoint "
                              "folder or null")
        if not 0 <= self.task_samples <= task.HELDOUT:
            raise ConfigError(f"grpo.task_samples={self.task_samples} must be between 0 and "
                              f"{task.HELDOUT} (the held-out problems)")
        training = len(task.problems("train"))
        if not 0 <= self.train_problems <= training:
            raise ConfigError(f"grpo.train_problems={self.train_problems} must be between 0 "
                              f"and {training} (the task's training problems; 0: all)")


@dataclass(kw_only=True)
class RewardModelConfig:
    objective: str = "bradley_terry"
    """``bradley_terry``: one score trained on preference pairs (``-log sigmoid(r_chosen -
    r_rejected)``); ``regression``: one score per attribute, mean squared error to rated
    responses (HelpSteer, Nemotron-4 340B Reward)."""
    attributes: list[str] = field(default_factory=lambda: ["helpfulness", "correctness",
                                                           "coherence", "complexity",
                                                           "verbosity"])
    """Regression: the rated attributes (HelpSteer2's five), in the head's output order."""
    train_path: str | None = None
    """JSONL of pairs (bradley_terry, the DPO format) or of rated responses (regression,
    ``{"prompt": [...], "response": ..., "attributes": {name: score}}``); None with
    bradley_terry: the arithmetic task's training pairs."""
    valid_path: str | None = None
    """JSONL of held-out pairs or rated responses; None with bradley_terry: the task's."""

    def validate(self) -> None:
        check_choice("reward_model.objective", self.objective, ("bradley_terry", "regression"))
        for name in ("train_path", "valid_path"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"reward_model.{name} is empty: give a JSONL file or null "
                                  f"for the default set")
        if self.objective == "regression":
            if not self.attributes:
                raise ConfigError("reward_model.attributes is empty: name the rated attributes "
                                  "of reward_model.objective=regression")
            if self.train_path is None or self.valid_path is None:
                raise ConfigError("reward_model.objective=regression needs rated responses: "
                                  "set reward_model.train_path and reward_model.valid_path")

    @property
    def outputs(self) -> int:
        """Scores the head gives per sequence."""
        return len(self.attributes) if self.objective == "regression" else 1
