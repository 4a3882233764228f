"""The GRPO stage: reinforcement learning with verifiable rewards (Shao et al., arXiv
2402.03300, as Nemotron Nano 2 and Nemotron 3 were post-trained after SFT).

``megatron-hybrid grpo RECIPE [key=value ...]`` starts the policy from ``checkpoint.load``
(e.g. the DPO or SFT checkpoint). Each step:

1. **Rollouts.** ``grpo.rollout_batch`` prompts of the arithmetic task (``stages/task.py``),
   each sampled ``grpo.group_size`` times at ``grpo.temperature`` through a
   :class:`~megatron_hybrid.inference.session.Session` (Megatron-Core's dynamic engine, paged
   KV cache and Mamba state slots) built around the very module being trained: the engine
   holds no copy of the weights, so refreshing it is building the session anew each step
   (an empty context, the model in eval mode). A DP rank samples its share of the prompts;
   the TP and PP ranks of a model replica sample the same tokens (same requests, same seed).
2. **Rewards.** The checkers of ``grpo.rewards`` (``stages/rewards.py``), weighted and summed,
   plus ``grpo.reward_model_weight`` times the score a trained reward model
   (``grpo.reward_model``, ``stages/reward_model.py``) gives each prompt and completion: a
   frozen copy on the policy's device, at TP = PP = 1.
3. **Advantages.** Per group, ``(r - mean) / std``; a group whose rewards are all equal
   teaches nothing and gets exactly 0.
4. **Log-probabilities.** The trainer recomputes each response token's log-probability
   (forward only, through Megatron-Core's schedules: any TP/PP layout) and the reference's:
   with LoRA the policy with its adapters off (``model.adapters.adapters_disabled``, no second
   copy of the weights), else a frozen copy of the initial policy.
5. **Update.** ``grpo.updates_per_rollout`` optimizer steps on the loss, per response token,

       -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3,
       ratio = exp(logp - logp_old),   k3 = exp(ref - logp) - (ref - logp) - 1,

   averaged over every response token of the global batch (token-level aggregation, exact
   across layouts by the engine's per-token loss).

Per log interval (``train.log_interval``) the run's ``metrics.jsonl`` gets a ``train`` record,
as pretraining's (``engine/metrics.py``: loss curve, TensorBoard): ``loss`` is the GRPO
objective, with the mean reward (``reward``; each checker's and the reward model's unweighted,
``reward/<name>``), the KL to the reference, the clip fraction, the mean response length and
the largest gap between the engine's and the trainer's log-probability of a sampled token (0
up to rounding when the engine sees the trained weights), averaged over the interval. The
report ``grpo_report.{md,json}`` adds the held-out task accuracy before and after, and
``reward.png`` plots the mean reward per logged step.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.stages import rewards as reward_lib
from megatron_hybrid.stages.config import GRPOConfig
from megatron_hybrid.stages.grpo_objective import Tally, forward_step, token_logps
from megatron_hybrid.stages.rollouts import Rollouts, sample_rollouts, with_training_inputs

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REPORT = "grpo_report"
METRICS = "metrics.jsonl"
REWARD_PLOT = "reward.png"
"""The mean reward per logged step, plotted in the run's folder."""


def check_request(cfg: RunConfig, grpo: GRPOConfig) -> None:
    """Refuse, in one line each, what GRPO cannot train."""
    cfg.validate()
    grpo.validate()
    rollouts = grpo.rollout_batch * grpo.group_size
    if cfg.train.global_batch_size != rollouts:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} must equal "
                          f"grpo.rollout_batch * grpo.group_size = {rollouts} (a step trains on "
                          f"its rollouts): set train.global_batch_size={rollouts}")
    if cfg.parallel.cp != 1 or cfg.parallel.sequence_parallel:
        raise ConfigError("GRPO samples its rollouts on the inference engine, which runs "
                          "neither context nor sequence parallel: set parallel.cp=1 and "
                          "parallel.sequence_parallel=false")
    reward_lib.load_checkers(grpo.rewards)  # importable before the model loads
    if grpo.reward_model is not None:
        reward_model_config(cfg, grpo)


def reward_model_config(cfg: RunConfig, grpo: GRPOConfig):
    """The model of the reward-model checkpoint ``grpo.reward_model``, after refusing, in one
    line each, a layout it cannot score on and a checkpoint it cannot score with."""
    from megatron_hybrid.stages import reward_model
    from megatron_hybrid.stages.common import saved_model

    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1:
        raise ConfigError("grpo.reward_model scores rollouts at parallel.tp=1 and "
                          "parallel.pp=1 only (data parallel is fine): set parallel.tp=1 and "
                          "parallel.pp=1, or grpo.reward_model=null")
    model = saved_model(grpo.reward_model, cfg.model.transformer_impl)
    if model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"the reward model's vocabulary ({model.vocab_size}) differs from the "
                          f"policy's ({cfg.model.vocab_size}): train it on the policy's "
                          f"tokenizer")
    if reward_model.saved_head_outputs(grpo.reward_model) != 1:
        raise ConfigError(f"grpo.reward_model={grpo.reward_model} has no one-score reward "
                          f"head: give a checkpoint of megatron-hybrid reward-model with "
                          f"reward_model.objective=bradley_terry")
    return model


# -- the reference ----------------------------------------------------------------------------

def reference_scorer(cfg: RunConfig, trainer, score, backend: str):
    """``samples -> [n, s]`` reference log-probabilities: with LoRA the policy with its
    adapters off (no second copy of the weights), else a frozen copy of the initial policy
    (the policy's own weights at step 0, ``checkpoint.load`` on resume)."""
    from megatron_hybrid.checkpoint.dist_checkpoint import load_weights, unwrap
    from megatron_hybrid.engine import training_loop
    from megatron_hybrid.model import adapters
    from megatron_hybrid.model.build import build_model

    chunks = trainer.model_chunks
    if cfg.peft.enabled:
        def disabled(samples):
            with contextlib.ExitStack() as stack:
                for chunk in chunks:
                    stack.enter_context(adapters.adapters_disabled(unwrap(chunk)))
                return score(chunks, samples)
        return disabled
    if trainer.state.step > 0 and not cfg.checkpoint.load:
        raise ConfigError("this GRPO run resumes and its reference (the initial policy) was "
                          "never saved: set checkpoint.load to the checkpoint it started from")
    frozen = build_model(cfg.model, training_loop.model_layout(cfg, trainer.dims),
                         backend=backend, peft=cfg.peft)
    if trainer.state.step > 0:
        load_weights([frozen], cfg.checkpoint.load)
    else:
        frozen.load_state_dict(unwrap(chunks[0]).state_dict())
    frozen.requires_grad_(False)
    frozen.config.calculate_per_token_loss = True
    return partial(score, [frozen])


def reward_model_scorer(cfg: RunConfig, grpo: GRPOConfig, dims, backend: str):
    """``samples -> [n]`` scores of the reward model ``grpo.reward_model``: frozen, on the
    policy's device and layout, reading each rollout's prompt and completion."""
    from megatron_hybrid.engine import training_loop
    from megatron_hybrid.stages import reward_model

    model = reward_model.load_scorer(grpo.reward_model, reward_model_config(cfg, grpo),
                                     training_loop.model_layout(cfg, dims), backend)
    score = partial(reward_model.score_sequences, [model], outputs=1,
                    micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.seq_length)
    return lambda samples: score(samples)[:, 0]


# -- the stage --------------------------------------------------------------------------------

def optimize(cfg: RunConfig, grpo: GRPOConfig, backend: str, dims) -> dict:
    """GRPO-train ``cfg``'s model on the task's prompts; return (and write) the report."""
    from megatron_hybrid.data.tokenizer import load_tokenizer
    from megatron_hybrid.engine import training_loop

    check_request(cfg, grpo)
    if grpo.rollout_batch % dims.dp:
        raise ConfigError(f"grpo.rollout_batch={grpo.rollout_batch} must be a multiple of the "
                          f"data-parallel size ({dims.dp}): each DP rank samples a share")
    tokenizer = load_tokenizer(cfg.tokenizer)
    prompts = reward_lib.task_prompts("train", problems=grpo.train_problems or None)
    _check_length(cfg, grpo, prompts, tokenizer)
    trainer = training_loop.build_trainer(cfg, backend, dims, datasets=(None, None))
    loop = Loop(cfg, grpo, trainer, tokenizer, prompts, backend)
    start = loop.start_measurement()
    history = loop.run()
    report = {"checkpoint": cfg.checkpoint.load,
              "output": str(Path(cfg.resolved_output_dir) / "checkpoints"),
              "grpo": {"group_size": grpo.group_size, "rollout_batch": grpo.rollout_batch,
                       "kl_coef": grpo.kl_coef, "clip_range": grpo.clip_range,
                       "temperature": grpo.temperature, "rewards": grpo.rewards},
              "prompts": len(prompts),
              "start": start, "end": {"step": trainer.state.step, **loop.measure()},
              "rewards": [[record["step"], record["reward"]] for record in history]}
    if int(os.environ.get("RANK", 0)) == 0:
        write_report(report, trainer.run_dir)
    return report


def _check_length(cfg: RunConfig, grpo: GRPOConfig, prompts, tokenizer) -> None:
    from megatron_hybrid.data import chat

    longest = max(len(chat.prompt_ids(prompt.messages, tokenizer)) for prompt in prompts)
    if longest + grpo.max_new_tokens > cfg.seq_length:
        raise ConfigError(f"a prompt of {longest} tokens + grpo.max_new_tokens="
                          f"{grpo.max_new_tokens} exceeds the sequence length "
                          f"({cfg.seq_length}): set train.seq_length="
                          f"{longest + grpo.max_new_tokens} or more")


class Loop:
    """The GRPO steps of one run: rollouts, log-probabilities, updates, metrics, checkpoints."""

    def __init__(self, cfg: RunConfig, grpo: GRPOConfig, trainer, tokenizer, prompts: list,
                 backend: str):
        from megatron_hybrid import mcore
        from megatron_hybrid.data import chat

        self.cfg, self.grpo, self.trainer, self.tokenizer = cfg, grpo, trainer, tokenizer
        self.prompts = prompts
        self.order = chat.EpochOrder(len(prompts), cfg.data.seed)
        self.checkers = reward_lib.load_checkers(grpo.rewards)
        self.dp_rank = mcore.parallel_state.get_data_parallel_rank()
        self.score = partial(token_logps, micro_batch_size=cfg.train.micro_batch_size,
                             seq_length=cfg.seq_length)
        self.reference = reference_scorer(cfg, trainer, self.score, backend)
        self.reward_model = (reward_model_scorer(cfg, grpo, trainer.dims, backend)
                             if grpo.reward_model is not None else None)

    def step_prompts(self, step: int) -> list:
        """This DP rank's share of step ``step``'s prompts (a seeded pass over the prompts)."""
        count, share = self.grpo.rollout_batch, self.grpo.rollout_batch // self.trainer.dims.dp
        first = (step - 1) * count + self.dp_rank * share
        return [self.prompts[self.order(sample)] for sample in range(first, first + share)]

    def rollouts(self, step: int) -> Rollouts:
        from megatron_hybrid.engine import training_step

        chunks = self.trainer.model_chunks
        training_step.sync_params(chunks)  # the engine reads the trained weights
        return sample_rollouts(chunks[0], self.tokenizer, self.step_prompts(step), self.grpo,
                               self.checkers, seed=_seed(self.cfg.train.seed, step, self.dp_rank),
                               seq_length=self.cfg.seq_length, reward_model=self.reward_model)

    def step(self, step: int) -> tuple:
        """One GRPO step: the engine's step result and the step's metrics (identical on
        every rank)."""
        from megatron_hybrid.engine import training_step

        trainer, grpo, train = self.trainer, self.grpo, self.cfg.train
        rollouts = self.rollouts(step)
        old = self.score(trainer.model_chunks, rollouts.samples)
        ref = self.reference(rollouts.samples) if grpo.kl_coef else old
        samples = with_training_inputs(rollouts, old, ref, grpo.group_size)
        tally = Tally()
        for _ in range(grpo.updates_per_rollout):
            result = training_step.train_step(
                trainer.model_chunks, trainer.optimizer, _microbatches(samples, train),
                num_microbatches=trainer.num_microbatches,
                micro_batch_size=train.micro_batch_size, seq_length=self.cfg.seq_length,
                forward_step=partial(forward_step, grpo.clip_range, grpo.kl_coef, tally))
        if trainer.optimizer.update_applied:
            trainer.scheduler.step(increment=1)
        return result, step_metrics(rollouts, old, tally)

    def run(self) -> list[dict]:
        """Steps to ``cfg.total_steps`` (from a resumed step), logged to the run's
        ``metrics.jsonl``; the logged records."""
        from megatron_hybrid.engine import metrics, training_step

        trainer, state, cfg = self.trainer, self.trainer.state, self.cfg
        tokens = cfg.train.global_batch_size * cfg.seq_length
        interval = []
        with self.tracker() as tracker:
            while state.step < cfg.total_steps:
                started = time.perf_counter()
                result, measured = self.step(state.step + 1)
                state.step += 1
                state.consumed_samples += cfg.train.global_batch_size
                state.tokens += tokens
                interval.append(measured)
                extra = _means(interval) if tracker.is_log_step(state.step) else None
                record = tracker.step(state.step, loss=result.loss, grad_norm=result.grad_norm,
                                      lr=trainer.optimizer.param_groups[0]["lr"], tokens=tokens,
                                      seconds=time.perf_counter() - started, extra=extra)
                interval = [] if extra else interval
                if record is not None:
                    print(_reward_line(record), flush=True)
                if trainer.checkpointer.should_save(state.step,
                                                    final=state.step == cfg.total_steps):
                    training_step.sync_params(trainer.model_chunks)
                    trainer.checkpointer.save(state, trainer.model_chunks, trainer.optimizer,
                                              trainer.scheduler)
        if int(os.environ.get("RANK", 0)) == 0 and cfg.logging.plot:
            metrics.plot_loss_curve(trainer.run_dir / METRICS, trainer.run_dir / "loss.png",
                                    title=cfg.name)
        return read_metrics(trainer.run_dir)

    def tracker(self):
        """The run's metrics tracker (``metrics.jsonl``, TensorBoard, the terminal)."""
        from megatron_hybrid.engine import metrics

        cfg = self.cfg
        return metrics.MetricsTracker(
            self.trainer.run_dir, is_logging_rank=int(os.environ.get("RANK", 0)) == 0,
            world_size=self.trainer.dims.world_size, total_steps=cfg.total_steps,
            log_interval=cfg.train.log_interval, progress=cfg.logging.progress_bar,
            tensorboard=cfg.logging.tensorboard, tokens_seen=self.trainer.state.tokens)

    def measure(self) -> dict:
        """The held-out task accuracy (None when not measured or the layout cannot decode)."""
        from megatron_hybrid.stages import task

        if self.trainer.dims.model_parallel != 1 or not self.grpo.task_samples:
            return {"accuracy": None}
        answers = task.heldout_answers(self.trainer.model_chunks[0], self.tokenizer,
                                       samples=self.grpo.task_samples,
                                       max_new_tokens=max(self.grpo.max_new_tokens,
                                                          task.MAX_NEW_TOKENS))
        return {"accuracy": task.accuracy(answers)}

    def start_measurement(self) -> dict:
        """The accuracy before RL: measured at step 0 and saved, read back on resume."""
        path = self.trainer.run_dir / "grpo_start.json"
        if self.trainer.state.step > 0 and path.is_file():
            return json.loads(path.read_text())
        start = {"step": self.trainer.state.step, **self.measure()}
        if int(os.environ.get("RANK", 0)) == 0:
            self.trainer.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(start))
        return start


def _seed(seed: int, step: int, dp_rank: int) -> int:
    """The sampler's seed of a step on a DP rank (its TP and PP ranks share it)."""
    return (seed * 1_000_003 + step) * 1_009 + dp_rank


def _microbatches(samples: list[dict], train):
    size = train.micro_batch_size
    return iter([torch.utils.data.default_collate(samples[start:start + size])
                 for start in range(0, len(samples), size)])


def step_metrics(rollouts: Rollouts, old_logp: torch.Tensor, tally: Tally) -> dict:
    """Means over the global batch: reward (and each checker's and the reward model's,
    unweighted), response length, KL to the reference and clip fraction (per response token),
    and the largest gap between the engine's and the trainer's log-probability of a sampled
    token."""
    import torch.distributed as dist

    from megatron_hybrid import mcore

    state = mcore.parallel_state
    mask = torch.stack([sample["loss_mask"] for sample in rollouts.samples])
    engine = torch.stack([sample["engine_logp"] for sample in rollouts.samples])
    sums = torch.tensor([float(rollouts.rewards.sum()), len(rollouts.samples),
                         float(mask.sum()), *(sum(values) for values in rollouts.scores.values()),
                         tally.kl, tally.clipped, tally.tokens], dtype=torch.float64)
    gap = ((engine - old_logp).abs() * mask).max().reshape(1)
    dist.all_reduce(sums, group=state.get_data_parallel_group())
    dist.all_reduce(gap, op=dist.ReduceOp.MAX, group=state.get_data_parallel_group())
    if state.get_pipeline_model_parallel_world_size() > 1:  # the tally is the last stage's
        tail = sums[-3:].clone()
        dist.all_reduce(tail, group=state.get_pipeline_model_parallel_group())
        sums[-3:] = tail
    reward, count, tokens, *per_score = sums[:-3].tolist()
    kl, clipped, trained = sums[-3:].tolist()
    return {"reward": reward / count,
            **{f"reward/{name.rpartition(':')[2]}": value / count
               for name, value in zip(rollouts.scores, per_score)},
            "response_length": tokens / count, "kl": kl / max(trained, 1),
            "clip_fraction": clipped / max(trained, 1), "engine_logp_gap": float(gap)}


def _means(records: list[dict]) -> dict:
    """Each metric's mean over the steps of a log interval."""
    return {key: sum(record[key] for record in records) / len(records) for key in records[0]}


def _reward_line(record: dict) -> str:
    return (f"step {record['step']} | reward {record['reward']:.3f} | kl {record['kl']:.4f} | "
            f"clip {record['clip_fraction']:.3f} | length {record['response_length']:.1f}")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The train records of the run's ``metrics.jsonl`` in step order (the last of a step
    logged twice, as a resumed run may): one per log interval, its GRPO metrics averaged."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]


# -- report -----------------------------------------------------------------------------------

def write_report(report: dict, run_dir: Path) -> None:
    """``grpo_report.{json,md}``, ``reward.png``, and the pipeline report's summary."""
    from megatron_hybrid.engine import metrics
    from megatron_hybrid.stages.common import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))
    summary = summary_of(report)
    curves = {"mean reward per step": report["rewards"]}
    if len(summary["reward_per_pass"]) > 1:
        curves[f"mean over each pass over the {report['prompts']} prompts"] = [
            (last, reward) for _, last, reward in summary["reward_per_pass"]]
    metrics.plot_curves(curves, run_dir / REWARD_PLOT, title="GRPO", ylabel="mean reward")
    task_metrics = {f"{name} at start": value
                    for name, value in (summary["accuracy_before"] or {}).items()}
    task_metrics.update(summary["accuracy_after"] or {})
    rewards = [reward for *_, reward in summary["reward_per_pass"]]
    if len(rewards) < 2:
        rewards = [reward for _, reward in summary["reward_per_step"]]
    if rewards:
        task_metrics.update({"mean reward at start": rewards[0], "mean reward": rewards[-1]})
    write_summary(run_dir, task_metrics=task_metrics)


def summary_of(report: dict) -> dict:
    """The stage's summary: mean reward per logged step ``[[step, reward], ...]`` (averaged
    over its ``train.log_interval``), per pass over the prompts (:func:`pass_means`), and the
    held-out task accuracies (``{"accuracy /think": x, ...}`` or None) before and after RL.
    Passes are whole steps only when the step's prompts divide the prompts (else, and for a
    report that does not count its prompts, there are none)."""
    steps_per_pass, straddled = divmod(report.get("prompts", 0), report["grpo"]["rollout_batch"])
    return {"reward_per_step": report["rewards"],
            "reward_per_pass": ([] if straddled or not steps_per_pass
                                else pass_means(report["rewards"], steps_per_pass)),
            "accuracy_before": report["start"]["accuracy"],
            "accuracy_after": report["end"]["accuracy"]}


def pass_means(rewards: list, steps_per_pass: int) -> list[tuple[int, int, float]]:
    """``(first step, last step, mean reward)`` of each whole pass over the prompts: each pass
    asks every prompt once, so passes differ by what the policy learned, not by which prompts
    a step drew (a step's mean moves with its prompts' difficulty). Logged steps are grouped
    by the pass their step falls in."""
    passes: dict[int, list[float]] = {}
    for step, reward in rewards:
        passes.setdefault((step - 1) // steps_per_pass, []).append(reward)
    last_whole = (rewards[-1][0] // steps_per_pass) if rewards else 0
    return [(index * steps_per_pass + 1, (index + 1) * steps_per_pass, sum(got) / len(got))
            for index, got in sorted(passes.items()) if index < last_whole]


def read_report(run_dir: str | Path) -> dict:
    """A finished run's ``grpo_report.json``."""
    return json.loads((Path(run_dir) / f"{REPORT}.json").read_text())


def read_summary(run_dir: str | Path) -> dict:
    """:func:`summary_of` a finished run's report."""
    return summary_of(read_report(run_dir))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _accuracy(measured: dict, mode: str) -> float | None:
    return (measured["accuracy"] or {}).get(f"accuracy {mode}")


def format_markdown(report: dict) -> str:
    start, end, rewards = report["start"], report["end"], report["rewards"]
    first, last = (f"{rewards[i][1]:.3f}" if rewards else "n/a" for i in (0, -1))
    trend = reward_trend(report)
    return "\n".join([
        "# GRPO report", "",
        f"- from `{report['checkpoint']}` to `{report['output']}`",
        f"- settings: `{json.dumps(report['grpo'])}`", "",
        f"| | step {start['step']} | step {end['step']} |", "|---|---|---|",
        f"| mean reward of the step's rollouts | {first} | {last} |",
        *(f"| held-out task accuracy ({mode}) | {_percent(_accuracy(start, mode))} | "
          f"{_percent(_accuracy(end, mode))} |" for mode in ("/think", "/no_think")),
        "", f"{trend[:1].upper()}{trend[1:]}.", "",
        f"Mean reward per step and per pass: `{REWARD_PLOT}`; every metric per step: "
        f"`{METRICS}`.", ""])


def reward_trend(report: dict) -> str:
    """The mean reward over the first and the last whole pass over the prompts, or (with
    fewer than two passes) at the first and the last logged step."""
    rewards, passes = report["rewards"], summary_of(report)["reward_per_pass"]
    if len(passes) > 1:
        (first, end, start), (last_first, last, final) = passes[0], passes[-1]
        return (f"mean reward over a pass over the {report['prompts']} prompts {start:.3f} "
                f"(steps {first}-{end}) -> {final:.3f} (steps {last_first}-{last})")
    if not rewards:
        return "no steps"
    return (f"mean reward {rewards[0][1]:.3f} (step {rewards[0][0]}) -> {rewards[-1][1]:.3f} "
            f"(step {rewards[-1][0]})")


def format_summary(report: dict) -> str:
    trend = reward_trend(report)
    accuracies = ", ".join(f"{mode} {_percent(_accuracy(report['start'], mode))} -> "
                           f"{_percent(_accuracy(report['end'], mode))}"
                           for mode in ("/think", "/no_think"))
    return f"GRPO -> {report['output']}: {trend}, held-out task accuracy {accuracies}"
