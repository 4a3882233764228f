"""The DPO stage: direct preference optimisation (Rafailov et al., arXiv 2305.18290).

``megatron-hybrid dpo RECIPE [key=value ...]`` starts the policy from ``checkpoint.load``
(e.g. the SFT checkpoint) and trains it through the loop, checkpoints and metrics of
pretraining (``engine/training_loop.py``) on preference pairs (``data/chat.py``) with the loss

    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

per pair, where ``pi``/``ref`` are the policy's and the reference's log-probabilities of the
chosen (c) and rejected (r) response, summed over the response tokens, plus, with
``dpo.sft_loss_weight`` w > 0, ``w * (-pi_c / chosen tokens)``. The reference is the
initial policy, or with LoRA (``peft.method=lora``) the frozen base, the policy with its
adapters switched off (``model.adapters.adapters_disabled``; the two agree when the adapters
start at zero): its log-probabilities are computed once, before the first step, by a
forward-only pass of the policy itself, and travel in the batch (``ref_logp``), so no second
model is held and every TP/PP/DP layout works (CP is refused). The chosen and the rejected
sequence of a pair are neighbours in one micro-batch (its size must be even); the loss is a
sum over pairs with the pair count, so the engine averages over the pairs of the global batch
(the loop's "loss" is the mean DPO loss, its "tokens" count pairs).

The reference log-probabilities are saved in the run directory (``dpo_reference.pt``), so a
stopped run resumes against the same reference. The report ``dpo_report.{md,json}`` compares
held-out pairs at the start and the end: preference accuracy (the policy gives the chosen
response a higher log-probability than the rejected one), reward accuracy and margin (the
implicit rewards ``beta * (pi - ref)``) and the DPO loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.stages.config import DPOConfig

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REPORT = "dpo_report"
REFERENCE = "dpo_reference.pt"


def check_request(cfg: RunConfig, dpo: DPOConfig) -> None:
    """Refuse, in one line each, what DPO cannot train."""
    cfg.validate()
    dpo.validate()
    if cfg.train.micro_batch_size % 2:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be even "
                          f"for DPO (a micro-batch holds whole chosen/rejected pairs): set "
                          f"train.micro_batch_size={2 * cfg.train.micro_batch_size}")
    if cfg.parallel.cp != 1:
        raise ConfigError("DPO runs at parallel.cp=1 (a response's log-probability would be "
                          "split over the CP ranks): set parallel.cp=1")


# -- the loss ---------------------------------------------------------------------------------

def response_logps(per_token_nll, loss_mask):
    """Per sequence: the log-probability of its response, from the model's per-token
    cross-entropy ``[b, s]`` (``-log p``) summed over ``loss_mask``."""
    return -(per_token_nll.float() * loss_mask.float()).sum(dim=-1)


def dpo_loss(policy_logps, ref_logps, beta: float):
    """Per pair ``(loss, chosen reward, rejected reward)`` from sequence log-probabilities
    ordered chosen, rejected, chosen, ... (rewards: ``beta * (pi - ref)``)."""
    import torch.nn.functional as F

    rewards = beta * (policy_logps.float() - ref_logps.float())
    chosen, rejected = rewards[0::2], rewards[1::2]
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def loss_func(beta: float, sft_loss_weight: float, loss_mask, ref_logp, per_token_nll):
    """(loss sum over pairs, pair count, report), as the engine's LM loss function."""
    import torch

    policy_logps = response_logps(per_token_nll, loss_mask)
    losses, _, _ = dpo_loss(policy_logps, ref_logp, beta)
    if sft_loss_weight:
        chosen_tokens = loss_mask[0::2].float().sum(dim=-1).clamp(min=1)
        losses = losses - sft_loss_weight * policy_logps[0::2] / chosen_tokens
    loss_sum = losses.sum()
    pairs = torch.tensor(len(losses), dtype=torch.int, device=loss_sum.device)
    return loss_sum, pairs, {"lm loss": torch.stack([loss_sum.detach(), pairs.float()])}


def forward_step(beta: float, sft_loss_weight: float, data_iterator, model):
    """DPO forward step for Megatron-Core's schedules (``engine.train_step(forward_step=...)``
    with ``partial(forward_step, beta, sft_loss_weight)``): batches carry ``ref_logp`` per
    sequence."""
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    per_token_nll = model(batch["tokens"], None, None, labels=batch["labels"])
    return per_token_nll, partial(loss_func, beta, sft_loss_weight, batch["loss_mask"],
                                  batch["ref_logp"])


def logp_step(data_iterator, model):
    """Forward step whose report is each sequence's response log-probability (no loss)."""
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    per_token_nll = model(batch["tokens"], None, None, labels=batch["labels"])
    return per_token_nll, partial(_logp_report, batch["loss_mask"])


def _logp_report(loss_mask, per_token_nll):
    import torch

    logps = response_logps(per_token_nll, loss_mask).detach()
    return logps.sum() * 0, torch.tensor(0, dtype=torch.int), {"logp": logps}


def sequence_logps(model_chunks: list, sequences, *, micro_batch_size: int, seq_length: int,
                   dp_size: int):
    """Each sequence's response log-probability under the model (forward only), on every
    rank: each DP rank scores a contiguous share, padded to whole micro-batches."""
    import torch
    import torch.distributed as dist

    from megatron_hybrid import backends, mcore
    from megatron_hybrid.engine import training_step

    state = mcore.parallel_state
    count = len(sequences)
    per_rank = -(-count // (dp_size * micro_batch_size)) * micro_batch_size
    first = state.get_data_parallel_rank() * per_rank
    rows = list(range(first, first + per_rank))
    batches = (torch.utils.data.default_collate(
        [sequences.sample(min(row, count - 1)) for row in rows[start:start + micro_batch_size]])
        for start in range(0, per_rank, micro_batch_size))
    reports = training_step.forward_only(
        model_chunks, batches, forward_step=logp_step,
        num_microbatches=per_rank // micro_batch_size, micro_batch_size=micro_batch_size,
        seq_length=seq_length)
    # The padding rows at the end are dropped.
    logps = torch.zeros(dp_size * per_rank, device=backends.device())
    logps[first:first + per_rank] = training_step.last_stage_rows(reports, "logp", (per_rank,))
    dist.all_reduce(logps, group=state.get_data_parallel_group())
    return logps[:count].cpu()


def pair_metrics(policy_logps, ref_logps, beta: float) -> dict:
    """Means over pairs: preference accuracy (policy log-probability chosen > rejected),
    reward accuracy (implicit reward chosen > rejected), reward margin, DPO loss."""
    losses, chosen, rejected = dpo_loss(policy_logps, ref_logps, beta)
    return {"preference_accuracy": float((policy_logps[0::2] > policy_logps[1::2]).float().mean()),
            "reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "loss": float(losses.mean()), "pairs": len(losses)}


# -- the stage --------------------------------------------------------------------------------

def optimize(cfg: RunConfig, dpo: DPOConfig, backend: str, dims) -> dict:
    """DPO-train ``cfg``'s model on ``dpo``'s pairs; return (and write) the report."""
    from megatron_hybrid.engine import training_loop

    check_request(cfg, dpo)
    num_samples = cfg.total_steps * cfg.train.global_batch_size
    train_pairs, heldout_pairs = pairs_of(dpo, cfg.data.seed, num_samples // 2)
    train_seqs, heldout_seqs = _sequences(cfg, train_pairs, heldout_pairs)
    # The datasets carry reference log-probabilities, scored by the model built here.
    trainer = training_loop.build_trainer(
        cfg, backend, dims, forward_step=partial(forward_step, dpo.beta, dpo.sft_loss_weight),
        datasets=(None, None))
    score = partial(sequence_logps, trainer.model_chunks, seq_length=cfg.seq_length,
                    micro_batch_size=cfg.train.micro_batch_size, dp_size=dims.dp)
    reference = reference_logps(trainer, cfg, reference_scorer(score, trainer.model_chunks),
                                train_seqs, heldout_seqs)
    trainer = dataclasses.replace(trainer, **_datasets(cfg, num_samples, train_seqs,
                                                       heldout_seqs, reference))
    training_loop.fit(trainer)
    heldout_ref = reference["heldout"]
    report = {"checkpoint": cfg.checkpoint.load, "beta": dpo.beta,
              "output": str(Path(cfg.resolved_output_dir) / "checkpoints"),
              "train_pairs": len(train_pairs),
              "start": {"step": 0, **pair_metrics(heldout_ref, heldout_ref, dpo.beta)},
              "end": {"step": trainer.state.step,
                      **pair_metrics(score(heldout_seqs), heldout_ref, dpo.beta)}}
    if int(os.environ.get("RANK", 0)) == 0:
        write_report(report, trainer.run_dir)
    return report


def _sequences(cfg: RunConfig, *pair_lists) -> list:
    from megatron_hybrid.data import chat
    from megatron_hybrid.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    return [chat.pair_sequences(pairs, tokenizer, seq_length=cfg.seq_length)
            for pairs in pair_lists]


def _datasets(cfg: RunConfig, num_samples: int, train_seqs, heldout_seqs,
              reference: dict) -> dict:
    """The trainer's datasets: the run's training samples, and one evaluation's held-out
    samples, each carrying its reference log-probabilities."""
    from megatron_hybrid.data import chat

    seed = cfg.data.seed
    return {"train_data": chat.PreferenceDataset(train_seqs, reference["train"],
                                                 num_samples=num_samples, seed=seed),
            "valid_data": chat.PreferenceDataset(
                heldout_seqs, reference["heldout"], seed=seed,
                num_samples=cfg.train.eval_batches * cfg.train.global_batch_size)}


def pairs_of(dpo: DPOConfig, seed: int, needed: int) -> tuple[list, list]:
    """(training, held-out) pairs: the JSONL files or the task's splits (``stages/task.py``: right vs
    slipped answers); of the training pairs a seeded sample of the ``needed`` a run visits (all
    when it visits more), so the reference pass scores no pair the run never sees."""
    import numpy

    from megatron_hybrid.data import chat
    from megatron_hybrid.stages import task

    train = (chat.read_pairs(dpo.train_path) if dpo.train_path
             else task.preference_pairs("train"))
    heldout = (chat.read_pairs(dpo.valid_path) if dpo.valid_path
               else task.preference_pairs("valid"))
    chosen = numpy.random.default_rng(seed).permutation(len(train))[:needed]
    return [train[i] for i in sorted(chosen)], heldout


def reference_scorer(score, model_chunks: list):
    """``score`` with the LoRA adapters of ``model_chunks`` switched off: the reference is the
    base the adapters train on, held once (a model without adapters is scored as it is)."""
    from megatron_hybrid.model import adapters

    def reference(sequences):
        with contextlib.ExitStack() as stack:
            for chunk in model_chunks:
                stack.enter_context(adapters.adapters_disabled(chunk))
            return score(sequences)

    return reference


def reference_logps(trainer, cfg: RunConfig, score, train_seqs, heldout_seqs) -> dict:
    """The reference log-probabilities of the training and held-out sequences: scored by
    ``score`` (the initial policy) at step 0 and saved, read back when the run resumes."""
    import torch

    path = trainer.run_dir / REFERENCE
    identity = _identity(cfg, train_seqs, heldout_seqs)
    if trainer.state.step > 0:
        saved = torch.load(path, weights_only=True) if path.is_file() else {}
        if saved.get("identity") != identity:
            raise ConfigError(f"{path} is missing or belongs to other pairs or another initial "
                              f"checkpoint, so this run cannot resume against its reference: "
                              f"start it afresh in a new output_dir")
        return saved
    reference = {"identity": identity, "train": score(train_seqs), "heldout": score(heldout_seqs)}
    if int(os.environ.get("RANK", 0)) == 0:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_name(f".{path.name}.tmp")
        torch.save(reference, partial_path)
        os.replace(partial_path, path)  # never a half-written reference behind the final name
    return reference


def _identity(cfg: RunConfig, *sequences) -> str:
    digest = hashlib.sha256(str(cfg.checkpoint.load).encode())
    for seqs in sequences:
        digest.update(seqs.ids.tobytes())
    return digest.hexdigest()


# -- report -----------------------------------------------------------------------------------

METRICS = (("preference accuracy", "preference_accuracy", "{:.1%}"),
           ("reward accuracy", "reward_accuracy", "{:.1%}"),
           ("reward margin", "reward_margin", "{:.4f}"), ("DPO loss", "loss", "{:.4f}"))


def write_report(report: dict, run_dir: Path) -> None:
    """``dpo_report.{json,md}``, and the pipeline report's summary of the stage."""
    from megatron_hybrid.stages.common import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))
    start, end = report["start"], report["end"]
    write_summary(run_dir, heldout_loss=end["loss"], task_metrics={
        "preference accuracy at start": start["preference_accuracy"],
        "preference accuracy": end["preference_accuracy"],
        "reward accuracy": end["reward_accuracy"], "reward margin": end["reward_margin"]})


def format_markdown(report: dict) -> str:
    start, end = report["start"], report["end"]
    return "\n".join([
        "# DPO report", "",
        f"- from `{report['checkpoint']}` to `{report['output']}`; beta {report['beta']}; "
        f"{report['train_pairs']} training pairs; {end['pairs']} held-out pairs", "",
        f"| held-out pairs | step {start['step']} | step {end['step']} |", "|---|---|---|",
        *(f"| {name} | {form.format(start[key])} | {form.format(end[key])} |"
          for name, key, form in METRICS), ""])


def format_summary(report: dict) -> str:
    start, end = report["start"], report["end"]
    return (f"DPO -> {report['output']}: held-out preference accuracy "
            f"{start['preference_accuracy']:.1%} -> {end['preference_accuracy']:.1%}, reward "
            f"accuracy {end['reward_accuracy']:.1%}, margin {end['reward_margin']:.4f}")
