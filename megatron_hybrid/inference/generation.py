"""``megatron-hybrid generate``: complete prompts with a trained model on Megatron-Core's
dynamic engine (``session.Session``), printing as the tokens come.

One prompt streams its text to the terminal; several are decoded together (continuous
batching, whatever their lengths) and each is printed when it ends. ``--json`` prints one
object per prompt, ``{"tokens": [...], "text": "..."}``, the new tokens only. Under
``torchrun`` the model is split with ``--tp`` and ``--pp``; every rank runs the same requests
and rank 0 prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from megatron_hybrid.inference import prompts as prompt_sources
from megatron_hybrid.inference.loading import DEFAULT_MAX_REQUESTS, loaded_model


@dataclass(frozen=True)
class GenerateRequest:
    path: str
    prompts: tuple[prompt_sources.Prompt, ...]
    sampling: "object"
    """A ``session.Sampling`` without the chat stop token (added per prompt)."""
    reasoning: bool | None = None
    seed: int = 0
    tp: int = 1
    pp: int = 1
    backend: str = "auto"
    max_requests: int = DEFAULT_MAX_REQUESTS
    as_json: bool = False


def run(request: GenerateRequest, out=sys.stdout) -> list:
    """Generate for every prompt; the completions, in the prompts' order."""
    from megatron_hybrid.data import chat

    printing = int(os.environ.get("RANK", 0)) == 0
    with loaded_model(request.path, backend=request.backend, tp=request.tp, pp=request.pp,
                      seed=request.seed) as (model, tokenizer, model_config):
        from megatron_hybrid.inference.session import Session  # after the backend's install

        session = Session(model, tokenizer, max_requests=request.max_requests,
                          max_sequence_length=model_config.seq_length, seed=request.seed)
        eod = () if tokenizer.eod is None else (tokenizer.eod,)
        ids, samplings = [], []
        for prompt in request.prompts:
            ids.append(prompt_sources.prompt_ids(prompt, tokenizer, reasoning=request.reasoning))
            stops = eod
            if prompt_sources.is_chat(prompt, reasoning=request.reasoning):
                stops = (*eod, chat.special_ids(tokenizer)[chat.END_OF_TURN])
            samplings.append(_with_stop_tokens(request.sampling, stops))
        for sampling in samplings:
            sampling.validate()  # every prompt's before any runs
        printer = _Printer(out, enabled=printing, as_json=request.as_json,
                           streaming=len(ids) == 1 and not request.as_json)
        completions = session.generate(ids, samplings, on_update=printer.update)
    if printing and request.as_json:
        for completion in completions:
            print(json.dumps({"tokens": completion.token_ids, "text": completion.text}), file=out)
    return completions


def _with_stop_tokens(sampling, stops: tuple[int, ...]):
    return dataclasses.replace(sampling, stop_token_ids=(*sampling.stop_token_ids, *stops))


class _Printer:
    """Prints updates as ``generate`` promises: one prompt's text as it comes, several
    prompts' each when it ends (JSON is printed at the end, in the prompts' order)."""

    def __init__(self, out, *, enabled: bool, as_json: bool, streaming: bool):
        self.out, self.enabled, self.as_json, self.streaming = out, enabled, as_json, streaming
        self.texts: dict[int, str] = {}

    def update(self, update) -> None:
        if not self.enabled or self.as_json:
            return
        if self.streaming:
            self._write(update.text + ("\n" if update.finish_reason else ""))
            return
        self.texts[update.request_id] = self.texts.get(update.request_id, "") + update.text
        if update.finish_reason is not None:
            self._write(f"[{update.request_id}] {self.texts.pop(update.request_id)}\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
