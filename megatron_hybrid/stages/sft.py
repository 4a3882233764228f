"""The SFT stage: supervised fine-tuning on chat data with the reasoning toggle.

``megatron-hybrid sft RECIPE [key=value ...]`` starts from ``checkpoint.load`` (e.g. the
pretraining checkpoint) and trains through the loop, checkpoints and metrics of pretraining
(``engine/training_loop.py``) on conversations (``data/chat.py``) with the loss on assistant tokens only.
Packed conversations are isolated from each other (``engine.packed_forward_step``: document
boundaries reach the Mamba kernels as ``seq_idx`` and attention as ``cu_seqlens``). Without
``sft.train_path`` it trains on the arithmetic task of ``stages/task.py`` and measures on its
held-out problems.

The run directory also gets ``sft_report.{md,json}``, at the start and the end of the run:
the held-out assistant-token loss, overall and split by /think and /no_think, and the task
metric: the exact-match accuracy of greedy answers to ``sft.task_samples`` held-out problems,
with reasoning on and off (decoding needs tp = pp = cp = 1; other layouts report n/a).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.stages.common import chat_dataset, with_modelopt_spec
from megatron_hybrid.stages.config import SFTConfig

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REPORT = "sft_report"


# -- the stage --------------------------------------------------------------------------------

def check_request(cfg: RunConfig, sft: SFTConfig) -> None:
    """Refuse, in one line each, what SFT cannot train."""
    sft.validate()
    if not sft.pack:
        return
    if cfg.parallel.cp != 1:
        raise ConfigError("sft.pack=true runs at parallel.cp=1 (packed documents are not split "
                          "over CP ranks): set parallel.cp=1 or sft.pack=false")
    if cfg.parallel.pp != 1 and cfg.train.micro_batch_size != 1:
        raise ConfigError(f"sft.pack=true with parallel.pp={cfg.parallel.pp} needs "
                          f"train.micro_batch_size=1 (a packed micro-batch runs as one row): "
                          f"set train.micro_batch_size=1")


def finetune(cfg: RunConfig, sft: SFTConfig, backend: str, dims) -> dict:
    """Fine-tune ``cfg``'s model on ``sft``'s conversations; return (and write) the report."""
    from megatron_hybrid.data.tokenizer import load_tokenizer
    from megatron_hybrid.engine import training_loop, training_step
    from megatron_hybrid.quantization import ptq

    check_request(cfg, sft)
    if cfg.quant.enabled:  # ModelOpt quantizes the local spec's linears
        cfg = with_modelopt_spec(cfg, "sft")
    tokenizer = load_tokenizer(cfg.tokenizer)
    conversations, heldout = conversations_of(sft)
    probe = HeldOut(cfg, sft, heldout, tokenizer)
    step = training_step.packed_forward_step if sft.pack else training_step.lm_forward_step
    train_data = chat_dataset(cfg, conversations, tokenizer, sft.pack,
                              cfg.total_steps * cfg.train.global_batch_size)
    trainer = training_loop.build_trainer(
        cfg, backend, dims, forward_step=step,
        wrap_model=ptq.training_quantizer(cfg, backend, train_data, step),  # QAT with quant
        datasets=(train_data, probe.datasets["all"]))
    start = probe.measure(trainer)
    training_loop.fit(trainer)
    end = probe.measure(trainer)
    report = {"checkpoint": cfg.checkpoint.load,
              "output": str(Path(cfg.resolved_output_dir) / "checkpoints"),
              "data": {"train_conversations": len(conversations),
                       "heldout_conversations": len(heldout), "packed": sft.pack,
                       "train_sequences": len(trainer.train_data.sequences)},
              "start": start, "end": end}
    if int(os.environ.get("RANK", 0)) == 0:
        write_report(report, trainer.run_dir)
    return report


def conversations_of(sft: SFTConfig) -> tuple[list, list]:
    """(training, held-out) conversations: the JSONL files, or the task's splits."""
    from megatron_hybrid.data import chat
    from megatron_hybrid.stages import task

    train = (chat.read_conversations(sft.train_path) if sft.train_path
             else task.conversations("train"))
    heldout = (chat.read_conversations(sft.valid_path) if sft.valid_path
               else task.conversations("valid"))
    return train, heldout


def heldout_dataset(cfg: RunConfig, conversations: list, tokenizer, packed: bool):
    """The held-out samples of one evaluation (train.eval_batches global batches)."""
    return chat_dataset(cfg, conversations, tokenizer, packed,
                        cfg.train.eval_batches * cfg.train.global_batch_size)


class HeldOut:
    """The held-out measurements of the report: assistant-token loss (all, /think, /no_think)
    and the task's accuracy with reasoning on and off."""

    def __init__(self, cfg: RunConfig, sft: SFTConfig, conversations: list, tokenizer):
        self.cfg, self.sft, self.tokenizer = cfg, sft, tokenizer
        by_mode = {mode: [c for c in conversations if c.thinking == (mode == "think")]
                   for mode in ("think", "no_think")}
        self.datasets = {"all": heldout_dataset(cfg, conversations, tokenizer, sft.pack)}
        self.datasets.update({mode: heldout_dataset(cfg, group, tokenizer, sft.pack)
                              for mode, group in by_mode.items() if group})

    def measure(self, trainer) -> dict:
        from megatron_hybrid.engine import training_step

        train = self.cfg.train
        losses = {mode: training_step.eval_loss(
            trainer.model_chunks, trainer.batches(dataset, 0),
            num_microbatches=trainer.num_microbatches * train.eval_batches,
            micro_batch_size=train.micro_batch_size, seq_length=self.cfg.seq_length,
            forward_step=trainer.forward_step) for mode, dataset in self.datasets.items()}
        return {"step": trainer.state.step, "heldout_loss": losses, **self.task(trainer)}

    def task(self, trainer) -> dict:
        """The task accuracies (None when not measured or the layout cannot decode) and the
        greedy answers behind them."""
        from megatron_hybrid.stages import task

        if trainer.dims.model_parallel != 1 or not self.sft.task_samples:
            return {"accuracy": None, "answers": []}
        answers = task.heldout_answers(trainer.model_chunks[0], self.tokenizer,
                                       samples=self.sft.task_samples,
                                       max_new_tokens=self.sft.max_new_tokens)
        return {"accuracy": task.accuracy(answers), "answers": answers}


# -- report -----------------------------------------------------------------------------------

MODES = ("/think", "/no_think")


def write_report(report: dict, run_dir: Path) -> None:
    """``sft_report.{json,md}``, and the pipeline report's summary of the stage: the held-out
    task accuracies with reasoning on and off, at the start and the end."""
    from megatron_hybrid.stages.common import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))
    metrics = {}
    for when, suffix in (("start", " at start"), ("end", "")):
        metrics.update({f"{name}{suffix}": value
                        for name, value in (report[when]["accuracy"] or {}).items()})
    write_summary(run_dir, heldout_loss=report["end"]["heldout_loss"]["all"],
                  task_metrics=metrics)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _accuracy(measured: dict, mode: str) -> float | None:
    return (measured["accuracy"] or {}).get(f"accuracy {mode}")


def format_markdown(report: dict) -> str:
    start, end = report["start"], report["end"]
    rows = [(f"held-out assistant loss ({mode})", f"{start['heldout_loss'][mode]:.4f}",
             f"{end['heldout_loss'][mode]:.4f}") for mode in end["heldout_loss"]]
    rows += [(f"task accuracy ({mode})", _percent(_accuracy(start, mode)),
              _percent(_accuracy(end, mode))) for mode in MODES]
    examples = [f"- {'/think' if a['think'] else '/no_think'} `{a['question']}` -> "
                f"`{a['generated']!r}` ({'right' if a['correct'] else 'wrong'})"
                for a in end["answers"][:4] + end["answers"][-4:]]
    return "\n".join([
        "# SFT report", "",
        f"- from `{report['checkpoint']}` to `{report['output']}`",
        f"- data: `{json.dumps(report['data'])}`", "",
        f"| | step {start['step']} | step {end['step']} |", "|---|---|---|",
        *(f"| {name} | {before} | {after} |" for name, before, after in rows), "",
        "Greedy answers to held-out problems at the end (first and last four):", "",
        *examples, ""])


def format_summary(report: dict) -> str:
    start, end = report["start"], report["end"]
    accuracies = ", ".join(f"{mode} {_percent(_accuracy(start, mode))} -> "
                           f"{_percent(_accuracy(end, mode))}" for mode in MODES)
    return (f"fine-tuned -> {report['output']}: held-out assistant loss "
            f"{start['heldout_loss']['all']:.4f} -> {end['heldout_loss']['all']:.4f}, "
            f"task accuracy {accuracies}")
