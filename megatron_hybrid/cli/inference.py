"""``megatron-hybrid generate``: complete prompts with a trained model (see
``inference/generation.py``)."""

from __future__ import annotations

import argparse

from megatron_hybrid.cli import Command
from megatron_hybrid.errors import ConfigError


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT|HF_DIR",
                        help="a checkpoint (a run's step_* folder, or one converted from Hugging "
                             "Face) or a Hugging Face NemotronH directory")
    source = parser.add_argument_group("prompts (any mix; run and printed in this order)")
    source.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a text prompt (repeatable)")
    source.add_argument("--prompt-ids", action="append", default=[], metavar="1,2,3",
                        help="a prompt of token ids (repeatable)")
    source.add_argument("--prompts", metavar="FILE.jsonl",
                        help='one {"prompt": ...}, {"prompt_ids": [...]} or {"messages": [...]} '
                             "per line")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--greedy", action="store_true",
                          help="argmax tokens (the default unless --temperature is given)")
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="sample at this temperature (0: greedy)")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest")
    sampling.add_argument("--top-p", type=float, default=0.0,
                          help="sample among the likeliest tokens of this total probability")
    sampling.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    sampling.add_argument("--max-new-tokens", type=int, default=128)
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="end the text before this string (repeatable)")
    parser.add_argument("--reasoning", choices=("on", "off"),
                        help="chat: text prompts become a user message, and every chat prompt "
                             "gets /think (on) or /no_think (off)")
    parser.add_argument("--json", action="store_true",
                        help='print {"tokens": [...], "text": "..."} per prompt (new tokens only)')
    layout = parser.add_argument_group("layout (under torchrun, tp x pp processes)")
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--max-requests", type=int, default=8,
                        help="prompts decoded together; more wait for a free slot")
    layout.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")


def run_generate(args: argparse.Namespace) -> int:
    from megatron_hybrid.inference import generation, prompts
    from megatron_hybrid.inference.sampling import Sampling

    sources = [*(prompts.Prompt(text=text) for text in args.prompt),
               *(prompts.Prompt(ids=prompts.parse_ids(ids)) for ids in args.prompt_ids),
               *(prompts.read_jsonl(args.prompts) if args.prompts else ())]
    if not sources:
        raise ConfigError("no prompt: give --prompt TEXT, --prompt-ids 1,2,3 or --prompts "
                          "FILE.jsonl")
    if args.greedy and (args.temperature or args.top_k or args.top_p):
        raise ConfigError("--greedy with --temperature, --top-k or --top-p: choose greedy or "
                          "sampling")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop))
    sampling.validate()
    reasoning = None if args.reasoning is None else args.reasoning == "on"
    generation.run(generation.GenerateRequest(
        path=args.checkpoint, prompts=tuple(sources), sampling=sampling, reasoning=reasoning,
        seed=args.seed, tp=args.tp, pp=args.pp, backend=args.backend,
        max_requests=args.max_requests, as_json=args.json))
    return 0


COMMANDS = {"generate": Command("complete prompts with a trained model (cached, batched, "
                                "streamed; torchrun for --tp/--pp)",
                                add_generate_arguments, run_generate)}
