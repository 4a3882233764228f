"""GRPO's objective on Megatron-Core's schedules: group-normalized advantages, the clipped
policy-ratio surrogate with the k3 KL penalty per response token, and the forward-only pass
that gives each label's log-probability (the trainer's recomputation and the reference's).
The stage that samples, rewards and updates is ``stages/grpo.py``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Each reward's advantage within its group (consecutive ``group_size`` entries):
    ``(r - mean) / (std + eps)``, exactly 0 in a group whose rewards are all equal."""
    groups = rewards.double().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    advantages = centred / (groups.std(dim=1, keepdim=True) + eps)
    equal = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(equal, 0.0, advantages).reshape(-1).float()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per token, Schulman's k3 estimator of KL(policy || reference): ``exp(d) - d - 1`` with
    ``d = ref - logp``; >= 0, and exactly 0 where the two agree."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_objective(logp, old_logp, advantages, clip_range: float):
    """Per token ``(loss, clipped)``: PPO's clipped surrogate ``-min(ratio * A, clip(ratio) *
    A)`` with ``ratio = exp(logp - old_logp)`` and the advantage ``A`` of each token's
    sequence (``advantages`` ``[b]``, broadcast over ``[b, s]``); ``clipped``: the clip
    bound the token's term."""
    ratio = torch.exp(logp - old_logp)
    advantages = advantages[:, None]
    unclipped = ratio * advantages
    clipped_ratio = ratio.clamp(1 - clip_range, 1 + clip_range) * advantages
    return -torch.minimum(unclipped, clipped_ratio), clipped_ratio < unclipped


@dataclass
class Tally:
    """Sums over the response tokens a step's loss functions saw on this rank: the KL to
    the reference and the clipped tokens (read by the stage for its metrics)."""

    kl: float = 0.0
    clipped: float = 0.0
    tokens: float = 0.0

    def add(self, kl: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> None:
        self.kl += float((kl * mask).sum())
        self.clipped += float((clipped.float() * mask).sum())
        self.tokens += float(mask.sum())


def loss_func(clip_range: float, kl_coef: float, batch: dict, tally: Tally | None,
              per_token_nll):
    """(loss sum over response tokens, their count, report), as the engine's loss function."""
    mask = batch["loss_mask"].float()
    logp = -per_token_nll.float()
    loss, clipped = clipped_objective(logp, batch["old_logp"], batch["advantage"], clip_range)
    kl = k3_kl(logp, batch["ref_logp"])
    loss_sum = ((loss + kl_coef * kl) * mask).sum()
    if tally is not None:
        tally.add(kl.detach(), clipped, mask)
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}


def forward_step(clip_range: float, kl_coef: float, tally: Tally | None, data_iterator, model):
    """GRPO forward step for Megatron-Core's schedules (``engine.train_step``): batches carry
    ``old_logp`` and ``ref_logp`` per token and ``advantage`` per sequence."""
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    per_token_nll = model(batch["tokens"], None, None, labels=batch["labels"])
    return per_token_nll, partial(loss_func, clip_range, kl_coef, batch, tally)


def _logp_step(data_iterator, model):
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    per_token_nll = model(batch["tokens"], None, None, labels=batch["labels"])
    return per_token_nll, _logp_report


def _logp_report(per_token_nll):
    logp = -per_token_nll.detach().float()
    return logp.sum() * 0, torch.tensor(0, dtype=torch.int), {"logp": logp}


def token_logps(model_chunks: list, samples: list[dict], *, micro_batch_size: int,
                seq_length: int) -> torch.Tensor:
    """``[n, seq_length]``: each label's log-probability under the model (forward only) for
    this rank's ``samples`` (a multiple of ``micro_batch_size``), on every pipeline stage."""
    from megatron_hybrid.engine import training_step

    batches = (torch.utils.data.default_collate(samples[start:start + micro_batch_size])
               for start in range(0, len(samples), micro_batch_size))
    reports = training_step.forward_only(
        model_chunks, batches, forward_step=_logp_step,
        num_microbatches=len(samples) // micro_batch_size, micro_batch_size=micro_batch_size,
        seq_length=seq_length)
    return training_step.last_stage_rows(reports, "logp", (len(samples), seq_length))
