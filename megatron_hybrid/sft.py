"""The SFT stage: supervised fine-tuning on chat data with the reasoning toggle.

``megatron-hybrid sft RECIPE [key=value ...]`` starts from ``checkpoint.load`` (e.g. the
pretraining checkpoint) and trains through the loop, checkpoints and metrics of pretraining
(``train.py``) on packed conversations (``data/chat.py``) with the loss on assistant tokens
only. Without ``sft.train_path`` it trains on the offline default set built from the embedded
corpus, and measures on that set's held-out split.

The run directory also gets ``sft_report.{md,json}``, at the start and the end of the run:
the held-out assistant-token loss, overall and split by /think and /no_think, and the
"toggle obeyed" rate: held-out prompts are decoded greedily until their think block is known,
and an answer obeys when a /think prompt opens it with a non-empty ``<think>`` block and a
/no_think prompt with an empty one (decoding needs tp = pp = cp = 1; other layouts report
n/a).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_hybrid.config import ConfigError, RunConfig, SFTConfig

HELP = "supervised fine-tuning on chat data with the /think /no_think reasoning toggle"
REPORT = "sft_report"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/sft.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, applied last (e.g. sft.pack=false)")


def run(args) -> int:
    from megatron_hybrid import backends, recipe

    cfg = recipe.load_recipe(args.recipe, args.overrides)
    backends.install(cfg.parallel.backend)  # before train imports Megatron-Core
    from megatron_hybrid import train

    with train.session(cfg) as (backend, dims):
        report = finetune(cfg, cfg.sft, backend, dims)
    if int(os.environ.get("RANK", 0)) == 0:
        print(format_summary(report))
    return 0


# -- the stage --------------------------------------------------------------------------------

def finetune(cfg: RunConfig, sft: SFTConfig, backend: str, dims) -> dict:
    """Fine-tune ``cfg``'s model on ``sft``'s conversations; return (and write) the report."""
    from megatron_hybrid import train
    from megatron_hybrid.data.tokenizer import load_tokenizer

    sft.validate()
    tokenizer = load_tokenizer(cfg.tokenizer)
    conversations, heldout = conversations_of(sft)
    probe = HeldOut(cfg, sft, heldout, tokenizer)
    trainer = dataclasses.replace(
        train.build_trainer(cfg, backend, dims),
        train_data=chat_dataset(cfg, conversations, tokenizer, sft.pack,
                                cfg.total_steps * cfg.train.global_batch_size),
        valid_data=probe.datasets["all"])
    start = probe.measure(trainer)
    train.fit(trainer)
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
    """(training, held-out) conversations: the JSONL files, or the default set's splits."""
    from megatron_hybrid.data import chat

    train = (chat.read_conversations(sft.train_path) if sft.train_path
             else chat.default_conversations("train"))
    heldout = (chat.read_conversations(sft.valid_path) if sft.valid_path
               else chat.default_conversations("valid"))
    return train, heldout


def chat_dataset(cfg: RunConfig, conversations: list, tokenizer, packed: bool,
                 num_samples: int):
    """``num_samples`` samples of ``conversations``, packed in a seeded shuffle (data.seed)."""
    from megatron_hybrid.data import chat

    sequences = chat.pack_conversations(conversations, tokenizer, seq_length=cfg.seq_length,
                                        packed=packed, seed=cfg.data.seed)
    return chat.ChatDataset(sequences, num_samples=num_samples, seed=cfg.data.seed)


def heldout_dataset(cfg: RunConfig, conversations: list, tokenizer, packed: bool):
    """The held-out samples of one evaluation (train.eval_batches global batches)."""
    return chat_dataset(cfg, conversations, tokenizer, packed,
                        cfg.train.eval_batches * cfg.train.global_batch_size)


class HeldOut:
    """The held-out measurements of the report: assistant-token loss (all, /think, /no_think)
    and the toggle-obeyed rate of greedy answers."""

    def __init__(self, cfg: RunConfig, sft: SFTConfig, conversations: list, tokenizer):
        self.cfg, self.tokenizer, self.max_new_tokens = cfg, tokenizer, sft.max_new_tokens
        by_mode = {mode: [c for c in conversations if c.thinking == (mode == "think")]
                   for mode in ("think", "no_think")}
        self.datasets = {"all": heldout_dataset(cfg, conversations, tokenizer, sft.pack)}
        self.datasets.update({mode: heldout_dataset(cfg, group, tokenizer, sft.pack)
                              for mode, group in by_mode.items() if group})
        half = sft.toggle_prompts // 2
        self.prompts = [c for group in by_mode.values() for c in group[:half]]

    def measure(self, trainer) -> dict:
        from megatron_hybrid import engine

        train = self.cfg.train
        losses = {mode: engine.eval_loss(
            trainer.model_chunks, trainer.batches(dataset, 0),
            num_microbatches=trainer.num_microbatches * train.eval_batches,
            micro_batch_size=train.micro_batch_size, seq_length=self.cfg.seq_length,
            forward_step=trainer.forward_step) for mode, dataset in self.datasets.items()}
        return {"step": trainer.state.step, "heldout_loss": losses, **self.toggle(trainer)}

    def toggle(self, trainer) -> dict:
        """Toggle-obeyed rates (None when the layout cannot decode) and the answers."""
        if trainer.dims.model_parallel != 1 or not self.prompts:
            return {"toggle_obeyed": None, "answers": []}
        answers = [self.answer(trainer.model_chunks[0], c) for c in self.prompts]
        rates = {mode: _mean([a["obeyed"] for a in answers if a["think"] == (mode == "think")])
                 for mode in ("think", "no_think")}
        return {"toggle_obeyed": {"all": _mean([a["obeyed"] for a in answers]), **rates},
                "answers": answers}

    def answer(self, model, conversation) -> dict:
        from megatron_hybrid.data import chat

        ids = chat.special_ids(self.tokenizer)
        text = self.tokenizer.decode(think_block(
            model, chat.prompt_ids(conversation.prompt, self.tokenizer), self.max_new_tokens,
            think=conversation.thinking, open_id=ids[chat.THINK_OPEN],
            close_id=ids[chat.THINK_CLOSE]))
        return {"question": conversation.prompt[-1]["content"], "think": conversation.thinking,
                "generated": text, "obeyed": obeys_toggle(text, conversation.thinking)}


def think_block(model, prompt: list[int], max_new_tokens: int, *, think: bool, open_id: int,
                close_id: int) -> list[int]:
    """The greedy answer's tokens up to where its think block is known: two tokens decide,
    unless a /think answer opened a non-empty block, which runs to its ``</think>``."""
    from megatron_hybrid.generate import generate

    head = generate(model, prompt, 2)
    if not think or head[0] != open_id or close_id in head:
        return head
    return head + generate(model, prompt + head, max_new_tokens - 2, stop={close_id})


def obeys_toggle(generated: str, think: bool) -> bool:
    """Whether an answer opens with the think block its prompt asked for: non-empty for
    /think, empty for /no_think."""
    from megatron_hybrid.data import DataError, chat

    try:
        reasoning, _ = chat.split_response(generated)
    except DataError:
        return False
    return bool(reasoning.strip()) == think


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


# -- report -----------------------------------------------------------------------------------

def write_report(report: dict, run_dir: Path) -> None:
    """``sft_report.{json,md}``, and the pipeline report's summary of the stage."""
    from megatron_hybrid.report import write_summary

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))
    end = report["end"]
    metrics = {f"held-out loss /{mode}": end["heldout_loss"].get(mode)
               for mode in ("think", "no_think")}
    metrics.update({f"toggle obeyed /{mode}": (end["toggle_obeyed"] or {}).get(mode)
                    for mode in ("think", "no_think")})
    write_summary(run_dir, heldout_loss=end["heldout_loss"]["all"],
                  task_metrics={name: value for name, value in metrics.items()
                                if value is not None})


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def format_markdown(report: dict) -> str:
    start, end = report["start"], report["end"]
    rows = [(f"held-out assistant loss ({mode})", f"{start['heldout_loss'][mode]:.4f}",
             f"{end['heldout_loss'][mode]:.4f}") for mode in end["heldout_loss"]]
    for mode in ("all", "think", "no_think"):
        rates = [_percent((m["toggle_obeyed"] or {}).get(mode)) for m in (start, end)]
        rows.append((f"toggle obeyed ({mode})", *rates))
    openings = [f"- {'/think' if a['think'] else '/no_think'} {a['question']!r} -> "
                f"`{a['generated']!r}`" for a in end["answers"]]
    return "\n".join([
        "# SFT report", "",
        f"- from `{report['checkpoint']}` to `{report['output']}`",
        f"- data: `{json.dumps(report['data'])}`", "",
        f"| | step {start['step']} | step {end['step']} |", "|---|---|---|",
        *(f"| {name} | {before} | {after} |" for name, before, after in rows), "",
        "Greedy openings at the end (decoded until the think block is known):", "",
        *openings, ""])


def format_summary(report: dict) -> str:
    start, end = report["start"], report["end"]
    toggle = (end["toggle_obeyed"] or {}).get("all")
    return (f"fine-tuned -> {report['output']}: held-out assistant loss "
            f"{start['heldout_loss']['all']:.4f} -> {end['heldout_loss']['all']:.4f}, "
            f"toggle obeyed {_percent((start['toggle_obeyed'] or {}).get('all'))} -> "
            f"{_percent(toggle)}")
