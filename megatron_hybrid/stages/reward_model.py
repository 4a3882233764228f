"""The reward-model stage: a score head on the hybrid, trained on preferences or ratings.

``megatron-hybrid reward-model RECIPE [key=value ...]`` starts from ``checkpoint.load`` (e.g.
the SFT checkpoint) and adds a linear head (``reward_head``, on the last pipeline stage) that
reads the final hidden state (after the final norm) at the response's last token, the end of
its assistant turn. Two objectives (``reward_model.objective``):

- ``bradley_terry``: one score, trained on preference pairs (the DPO format; by default the
  arithmetic task's right vs slipped answers) with ``-log sigmoid(r_chosen - r_rejected)``; the
  chosen and the rejected sequence of a pair are neighbours in a micro-batch (even size);
- ``regression``: one score per attribute (``reward_model.attributes``, HelpSteer's five by
  default), trained by mean squared error on rated responses, as Nemotron-4 340B Reward.

The whole model trains through the loop, checkpoints and metrics of pretraining; the head is
saved with it. The report ``reward_model_report.{md,json}`` gives the held-out pairwise
accuracy (the chosen response scores higher) or the held-out mean squared error, at the start
and the end. CP is refused (a sequence's last token would be on one CP rank only). GRPO scores
its rollouts with a trained one-score model (``grpo.reward_model``: :func:`load_scorer`,
:func:`score_sequences`).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.stages.config import RewardModelConfig

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REPORT = "reward_model_report"
HEAD = "reward_head"


def check_request(cfg: RunConfig, options: RewardModelConfig) -> None:
    """Refuse, in one line each, what the reward-model stage cannot train."""
    cfg.validate()
    options.validate()
    if options.objective == "bradley_terry" and cfg.train.micro_batch_size % 2:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be even "
                          f"for reward_model.objective=bradley_terry (a micro-batch holds whole "
                          f"pairs): set train.micro_batch_size={2 * cfg.train.micro_batch_size}")
    if cfg.parallel.cp != 1:
        raise ConfigError("the reward model runs at parallel.cp=1 (it scores a sequence's last "
                          "token): set parallel.cp=1")


# -- the head ---------------------------------------------------------------------------------

def add_head(model, outputs: int):
    """``model`` with a ``reward_head`` linear (hidden -> ``outputs``) on its last pipeline
    stage, fed by a hook that keeps the decoder's final hidden states; returns the model."""
    from megatron_hybrid import mcore

    if not mcore.parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return model
    config = model.config
    head = torch.nn.Linear(config.hidden_size, outputs, dtype=config.params_dtype,
                           device=next(model.parameters()).device)
    torch.nn.init.normal_(head.weight, std=config.init_method_std)
    torch.nn.init.zeros_(head.bias)
    model.add_module(HEAD, head)
    model.decoder.register_forward_hook(_keep_hidden)
    return model


def _keep_hidden(decoder, inputs, output) -> None:
    decoder.final_hidden = output  # [s, b, h]


def last_token_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per sequence ``[b]``, the position whose input is the response's last token: one past
    the last label in the loss (where the model reads that token)."""
    seq = loss_mask.shape[1]
    last = seq - 1 - torch.flip(loss_mask, dims=[1]).argmax(dim=1)
    return (last + 1).clamp(max=seq - 1)


def scores_of(module, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[b, outputs]``: the head on the final hidden state at each sequence's last token."""
    hidden = module.decoder.final_hidden.transpose(0, 1)  # [b, s, h]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return getattr(module, HEAD)(hidden[rows, last_token_positions(loss_mask)]).float()


def saved_head_outputs(directory: str) -> int | None:
    """The scores per sequence of the head saved in checkpoint ``directory`` (None: no head,
    e.g. an SFT checkpoint)."""
    from torch.distributed.checkpoint import FileSystemReader

    head = FileSystemReader(str(directory)).read_metadata().state_dict_metadata.get(
        f"{HEAD}.weight")
    return None if head is None else head.size[0]


def load_scorer(directory: str, model_cfg, layout, backend: str):
    """The reward model saved in ``directory`` (its model ``model_cfg``, one score), built on
    ``layout`` and frozen: a scorer for another stage (GRPO)."""
    from megatron_hybrid.checkpoint.dist_checkpoint import load_weights
    from megatron_hybrid.model.build import build_model

    model = add_head(build_model(model_cfg, layout, backend=backend,
                                 perform_initialization=False), outputs=1)
    load_weights([model], directory)
    return model.requires_grad_(False)


# -- losses -----------------------------------------------------------------------------------

def bradley_terry_loss(scores: torch.Tensor) -> torch.Tensor:
    """Per pair, ``-log sigmoid(r_chosen - r_rejected)`` of scores ordered chosen, rejected,
    chosen, ..."""
    scores = scores.reshape(-1)
    return -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2])


def loss_func(objective: str, batch: dict, module, output):
    """(loss sum, count, report): per pair (Bradley-Terry) or per sequence (regression, the
    squared error summed over attributes), as the engine's loss function."""
    scores = scores_of(module, batch["loss_mask"])
    if objective == "bradley_terry":
        losses = bradley_terry_loss(scores)
    else:
        losses = ((scores - batch["target"].float()) ** 2).sum(dim=-1)
    loss_sum = losses.sum()
    count = torch.tensor(len(losses), dtype=torch.int, device=loss_sum.device)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()]),
                             "scores": scores.detach()}


def forward_step(objective: str, data_iterator, model):
    """Reward-model forward step for Megatron-Core's schedules."""
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    output = model(batch["tokens"], None, None)
    return output, partial(loss_func, objective, batch, unwrap(model))


def score_step(data_iterator, model):
    """Forward step that reports the head's scores (``[b, outputs]``) and no loss."""
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    output = model(batch["tokens"], None, None)
    return output, partial(_score_report, batch["loss_mask"], unwrap(model))


def _score_report(loss_mask, module, output):
    scores = scores_of(module, loss_mask).detach()
    return scores.sum() * 0, torch.tensor(0, dtype=torch.int), {"scores": scores}


def score_sequences(model_chunks: list, dataset, *, outputs: int, micro_batch_size: int,
                    seq_length: int) -> torch.Tensor:
    """``[n, outputs]``: the head's scores of every sample of ``dataset`` (``tokens`` and
    ``loss_mask``; n a multiple of ``micro_batch_size``), forward only, on this rank alone
    (TP and PP, not DP), on every pipeline stage."""
    from megatron_hybrid.engine import training_step

    count = len(dataset)
    batches = (torch.utils.data.default_collate([dataset[i] for i in range(
        start, start + micro_batch_size)]) for start in range(0, count, micro_batch_size))
    reports = training_step.forward_only(
        model_chunks, batches, forward_step=score_step,
        num_microbatches=count // micro_batch_size, micro_batch_size=micro_batch_size,
        seq_length=seq_length)
    return training_step.last_stage_rows(reports, "scores", (count, outputs))


def heldout_metrics(scores: torch.Tensor, dataset, objective: str) -> dict:
    """Bradley-Terry: pairwise accuracy (the chosen scores higher), mean margin and loss;
    regression: mean squared error per attribute."""
    if objective == "bradley_terry":
        scores = scores.reshape(-1)
        margins = scores[0::2] - scores[1::2]
        return {"pairwise_accuracy": float((margins > 0).float().mean()),
                "margin": float(margins.mean()),
                "loss": float(bradley_terry_loss(scores).mean()), "pairs": len(margins)}
    targets = torch.stack([dataset[i]["target"] for i in range(len(dataset))])
    return {"mse": float(((scores - targets) ** 2).mean()), "responses": len(targets)}


# -- data -------------------------------------------------------------------------------------

class ScoredDataset:
    """Samples of sequences (keyed like the pretraining datasets) with a ``target`` each:
    groups of ``group`` rows kept together and in order (2: a pair), groups in a seeded
    shuffle per epoch."""

    extra_keys = ("target",)

    def __init__(self, sequences, targets: torch.Tensor, *, num_samples: int, seed: int,
                 group: int):
        from megatron_hybrid.data import chat

        self.sequences, self.targets, self.group = sequences, targets, group
        self.num_samples = num_samples
        self.order = chat.EpochOrder(len(sequences) // group, seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, sample: int) -> dict[str, torch.Tensor]:
        row = self.group * self.order(sample // self.group) + sample % self.group
        return {**self.sequences.sample(row), "target": self.targets[row]}


def read_rated(path: str, attributes: list[str]) -> list[tuple[tuple, str, list[float]]]:
    """Rated responses ``(prompt, response, [score per attribute])`` from JSONL lines
    ``{"prompt": [...], "response": "...", "attributes": {name: score}}``."""
    from megatron_hybrid.data import DataError

    rated = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rated.append((tuple(record["prompt"]), record["response"],
                          [float(record["attributes"][name]) for name in attributes]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{number}: {type(err).__name__}: {err}; each line must be "
                            f'{{"prompt": [...], "response": "...", "attributes": '
                            f'{{{", ".join(attributes)}}}}}') from None
    return rated


def _datasets(cfg: RunConfig, options: RewardModelConfig, tokenizer, num_samples: int
              ) -> tuple:
    """(training, evaluation, held-out) datasets of pairs (Bradley-Terry) or rated responses:
    the loop's run and its evaluations sample them; the held-out one, for the report, holds
    each held-out sequence once, in order (whole micro-batches)."""
    from megatron_hybrid.data import chat
    from megatron_hybrid.stages import task

    seq, seed = cfg.seq_length, cfg.data.seed
    made = []
    for path, split in ((options.train_path, "train"), (options.valid_path, "valid")):
        if options.objective == "bradley_terry":
            pairs = chat.read_pairs(path) if path else task.preference_pairs(split)
            sequences = chat.pair_sequences(pairs, tokenizer, seq_length=seq)
            targets, group = torch.zeros(len(sequences), 1), 2
        else:
            rated = read_rated(path, options.attributes)
            examples = chat.tokenize([chat.segments(prompt, response)
                                      for prompt, response, _ in rated], tokenizer)
            sequences = chat.pack(examples, seq_length=seq, eod=tokenizer.eod, pad=tokenizer.pad,
                                  packed=False, name=lambda index: f"response {index + 1}")
            targets, group = torch.tensor([scores for _, _, scores in rated]), 1
        made.append((sequences, targets, group))
    (train_seqs, train_targets, group), (valid_seqs, valid_targets, _) = made
    heldout = len(valid_seqs) - len(valid_seqs) % cfg.train.micro_batch_size
    evaluated = cfg.train.eval_batches * cfg.train.global_batch_size
    return (ScoredDataset(train_seqs, train_targets, num_samples=num_samples, seed=seed,
                          group=group),
            ScoredDataset(valid_seqs, valid_targets, num_samples=evaluated, seed=seed,
                          group=group),
            _InOrder(valid_seqs, valid_targets, heldout))


class _InOrder:
    """The first ``count`` sequences in order, with their targets."""

    def __init__(self, sequences, targets, count: int):
        self.sequences, self.targets, self.count = sequences, targets, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return {**self.sequences.sample(row), "target": self.targets[row]}


# -- the stage --------------------------------------------------------------------------------

def train(cfg: RunConfig, options: RewardModelConfig, backend: str, dims) -> dict:
    """Train the reward model of ``cfg``; return (and write) the report."""
    from megatron_hybrid.data.tokenizer import load_tokenizer
    from megatron_hybrid.engine import training_loop

    check_request(cfg, options)
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_data, valid_data, heldout = _datasets(cfg, options, tokenizer,
                                                cfg.total_steps * cfg.train.global_batch_size)
    if len(heldout) < cfg.train.micro_batch_size:
        raise ConfigError(f"the held-out set has fewer sequences than train.micro_batch_size "
                          f"({cfg.train.micro_batch_size}): give more held-out data")
    trainer = training_loop.build_trainer(
        cfg, backend, dims, wrap_model=partial(add_head, outputs=options.outputs),
        forward_step=partial(forward_step, options.objective),
        datasets=(train_data, valid_data))
    measure = partial(_measure, trainer, heldout, options)
    start = measure()
    training_loop.fit(trainer)
    report = {"checkpoint": cfg.checkpoint.load, "objective": options.objective,
              "output": str(Path(cfg.resolved_output_dir) / "checkpoints"),
              "start": start, "end": measure()}
    if int(os.environ.get("RANK", 0)) == 0:
        write_report(report, trainer.run_dir)
    return report


def _measure(trainer, heldout, options: RewardModelConfig) -> dict:
    scores = score_sequences(trainer.model_chunks, heldout, outputs=options.outputs,
                             micro_batch_size=trainer.cfg.train.micro_batch_size,
                             seq_length=trainer.cfg.seq_length)
    return {"step": trainer.state.step, **heldout_metrics(scores, heldout, options.objective)}


# -- report -----------------------------------------------------------------------------------

METRICS = {"bradley_terry": (("pairwise accuracy", "pairwise_accuracy", "{:.1%}"),
                             ("score margin", "margin", "{:.4f}"),
                             ("Bradley-Terry loss", "loss", "{:.4f}")),
           "regression": (("mean squared error", "mse", "{:.4f}"),)}


def write_report(report: dict, run_dir: Path) -> None:
    """``reward_model_report.{json,md}``, and the pipeline report's summary of the stage."""
    from megatron_hybrid.stages.common import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))
    start, end = report["start"], report["end"]
    key = METRICS[report["objective"]][0][1]
    write_summary(run_dir, task_metrics={f"held-out {key} at start": start[key],
                                         f"held-out {key}": end[key]})


def format_markdown(report: dict) -> str:
    start, end = report["start"], report["end"]
    return "\n".join([
        "# Reward model report", "",
        f"- from `{report['checkpoint']}` to `{report['output']}`; objective "
        f"{report['objective']}", "",
        f"| held-out | step {start['step']} | step {end['step']} |", "|---|---|---|",
        *(f"| {name} | {form.format(start[key])} | {form.format(end[key])} |"
          for name, key, form in METRICS[report["objective"]]), ""])


def format_summary(report: dict) -> str:
    name, key, form = METRICS[report["objective"]][0]
    return (f"reward model -> {report['output']}: held-out {name} "
            f"{form.format(report['start'][key])} -> {form.format(report['end'][key])}")
