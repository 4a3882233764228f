"""GRPO's rollouts: groups of sampled completions of the task's prompts on Megatron-Core's
dynamic inference engine (a :class:`~megatron_hybrid.inference.session.Session` around the
model being trained), rewarded by the checkers (and a reward model), as training samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_hybrid.stages import rewards as reward_lib
from megatron_hybrid.stages.config import GRPOConfig
from megatron_hybrid.stages.grpo_objective import group_advantages

REWARD_MODEL = "reward_model"
"""The reward model's key among a rollout's scores (metrics: ``reward/reward_model``)."""


@dataclass
class Rollouts:
    """One rank's sampled completions, as training samples."""

    samples: list[dict]
    """Per completion: tokens, labels, loss_mask (the response's labels), position_ids and
    engine_logp (the engine's log-probability at each response label), ``[seq_length]``."""
    rewards: torch.Tensor
    """Per completion, the weighted reward."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    """Per checker (and :data:`REWARD_MODEL`), its unweighted reward of each completion."""

    @property
    def response_tokens(self) -> torch.Tensor:
        return torch.stack([sample["loss_mask"].sum() for sample in self.samples])


def rollout_sample(prompt_ids: list[int], response: list[int], log_probs: list[float], *,
                   seq_length: int, pad: int) -> dict:
    """A training sample of one completion: the response's labels in the loss, with the
    engine's log-probabilities beside them."""
    ids = (prompt_ids + response + [pad] * (seq_length + 1))[:seq_length + 1]
    first = len(prompt_ids) - 1  # the label position of the first response token
    mask = torch.zeros(seq_length)
    mask[first:first + len(response)] = 1
    engine_logp = torch.zeros(seq_length)
    engine_logp[first:first + len(response)] = torch.tensor(log_probs[:len(response)])
    tokens = torch.tensor(ids, dtype=torch.long)
    return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": mask,
            "position_ids": torch.arange(seq_length), "engine_logp": engine_logp}


def sample_rollouts(model, tokenizer, prompts: list[reward_lib.Prompt], grpo: GRPOConfig,
                    checkers: dict, *, seed: int, seq_length: int,
                    reward_model=None) -> Rollouts:
    """``grpo.group_size`` completions of each prompt (consecutive), sampled on a session
    built around ``model`` for this step, with their rewards: the checkers' weighted sum,
    plus ``grpo.reward_model_weight`` times ``reward_model(samples)`` (``[n]`` scores) when
    given. The model's mode is kept."""
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
    from megatron_hybrid.data import chat
    from megatron_hybrid.inference.sampling import Sampling
    from megatron_hybrid.inference.session import Session

    end_of_turn = chat.special_ids(tokenizer)[chat.END_OF_TURN]
    asked = [prompt for prompt in prompts for _ in range(grpo.group_size)]
    prompt_ids = [chat.prompt_ids(prompt.messages, tokenizer) for prompt in asked]
    sampling = Sampling(max_new_tokens=grpo.max_new_tokens, temperature=grpo.temperature,
                        stop_token_ids=(end_of_turn,))
    was_training = unwrap(model).training
    try:
        session = Session(model, tokenizer, max_requests=len(asked),
                          max_sequence_length=max(map(len, prompt_ids)) + grpo.max_new_tokens,
                          seed=seed, log_probs=True)
        completions = session.generate(prompt_ids, sampling)
    finally:
        unwrap(model).train(was_training)
    samples, scores = [], {name: [] for name in checkers}
    for prompt, ids, completion in zip(asked, prompt_ids, completions):
        # The stop token is part of what the policy chose: it is trained too.
        stopped = [end_of_turn] if completion.finish_reason == "stop" else []
        samples.append(rollout_sample(ids, completion.token_ids + stopped, completion.log_probs,
                                      seq_length=seq_length, pad=tokenizer.pad))
        for name, value in reward_lib.score(checkers, prompt, completion.text).items():
            scores[name].append(value)
    weighted = torch.tensor([reward_lib.total(checkers, {name: scores[name][index]
                                                         for name in checkers})
                             for index in range(len(asked))])
    if reward_model is not None:
        scores[REWARD_MODEL] = reward_model(samples).tolist()
        weighted += grpo.reward_model_weight * torch.tensor(scores[REWARD_MODEL])
    return Rollouts(samples, weighted, scores)


def with_training_inputs(rollouts: Rollouts, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                         group_size: int) -> list[dict]:
    """The samples the update trains on: each with its per-token old and reference
    log-probabilities and its group-normalized advantage."""
    advantages = group_advantages(rollouts.rewards, group_size)
    return [{**sample, "old_logp": old, "ref_logp": ref, "advantage": advantage}
            for sample, old, ref, advantage in zip(rollouts.samples, old_logp, ref_logp,
                                                    advantages)]
