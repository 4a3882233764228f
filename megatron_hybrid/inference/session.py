"""Requests in, tokens and text out: a generation session over Megatron-Core's dynamic engine.

A :class:`Session` owns one ``DynamicInferenceEngine`` (``engine.dynamic_engine``) and serves
any number of requests through it with continuous batching: a request submitted while others
decode joins the next step, a finished one frees its KV blocks and Mamba state slot at once.
Each :meth:`Session.step` runs one engine step and reports, per request, the tokens it gained
and the text they complete, so callers can stream (the ``generate`` command prints as tokens
come; the server sends them as server-sent events).

Stops are handled here, on text and token ids, not by the engine's ``stop_words`` (which
match token sequences, so a stop string tokenized differently in context is missed): a stop
string ends the text before it, and no part of it is ever streamed; a stop token (the chat
turn's end, end of document) ends the request without being shown. A request that stops, or
is cancelled, is finished in the engine the way a stop word is
(``DynamicInferenceEngine.stop_word_finished_request_ids``, dynamic_engine.py:249), which
releases its state at the next step.

Under tensor or pipeline parallelism every rank runs the same session with the same requests
in the same order (the engine's steps are collective); they all see the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from megatron_hybrid.inference import engine as engines
from megatron_hybrid.inference.sampling import Sampling

FINISH_REASONS = ("stop", "length", "cancelled")
"""Why a request ended, in OpenAI's words: a stop string or token, ``max_new_tokens``, or
:meth:`Session.cancel`."""


@dataclass
class Update:
    """What one request gained in one step."""

    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    """One of :data:`FINISH_REASONS` when the request ended in this step, else None."""


@dataclass
class Completion:
    """A finished request: its new tokens and their text (stops excluded)."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    log_probs: list[float] = field(default_factory=list)
    """With ``Session(log_probs=True)``: the model's log-probability (temperature 1) of each
    generated token, a stop token that ended the request included (last), else empty."""


@dataclass
class _Request:
    completion: Completion
    sampling: Sampling
    raw_tokens: list[int] = field(default_factory=list)
    """Every token the engine generated for it, stop tokens included."""
    shown: int = 0
    """Characters of the decoded text already reported."""


class Session:
    """Continuous-batching generation for ``model`` (Megatron-Core, in eval mode while the
    session lives) with ``tokenizer`` (``decode(ids) -> str``): at most ``max_requests``
    requests decode together, each of at most ``max_sequence_length`` tokens, prompt
    included; more wait their turn."""

    def __init__(self, model, tokenizer, *, max_requests: int, max_sequence_length: int,
                 seed: int = 0, log_probs: bool = False):
        if max_requests < 1:
            raise ValueError(f"max_requests={max_requests}: allow at least 1 request")
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.log_probs = log_probs
        self.engine = engines.dynamic_engine(model, max_requests=max_requests,
                                             max_sequence_length=max_sequence_length)
        self.reseed(seed)
        self._requests: dict[int, _Request] = {}

    def reseed(self, seed: int) -> None:
        """Restart the sampler's random stream (the engine has one for all requests)."""
        self.engine.controller.sampling_rng.manual_seed(seed)

    @property
    def busy(self) -> bool:
        """Requests are live, or the engine still holds a stopped or cancelled one, which
        the next step releases."""
        return bool(self._requests) or self.engine.has_unfinished_requests()

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling) -> int:
        """Queue a request; returns its id. Its first tokens come with a later :meth:`step`."""
        sampling.validate()
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise ValueError("an empty prompt: give at least one token")
        total = len(prompt_ids) + sampling.max_new_tokens
        if total > self.max_sequence_length:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens + max_new_tokens="
                             f"{sampling.max_new_tokens} is {total} tokens, over this session's "
                             f"{self.max_sequence_length}: shorten the prompt or ask for fewer "
                             f"tokens")
        # The engine's own counter, which its generate() draws from too: ids never meet.
        request_id = int(next(self.engine.request_counter))
        self._requests[request_id] = _Request(Completion(request_id, prompt_ids), sampling)
        params = sampling.engine_params()
        if self.log_probs:
            params.add_attributes({"return_log_probs": True, "skip_prompt_log_probs": True})
        self.engine.add_request(request_id, prompt_ids, params)
        return request_id

    def cancel(self, request_id: int) -> None:
        """End a request now (finish reason ``cancelled``); unknown or finished ids are
        ignored, so a client that leaves late is harmless."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, "cancelled", in_engine=True)

    def step(self) -> list[Update]:
        """One engine step (prefill and decode of everything active); the updates of the
        requests that gained tokens or ended. Nothing happens when no request is queued."""
        updates = []
        if not self.engine.has_unfinished_requests():
            return updates
        result = self.engine.step_modern()
        # A finished request has left the engine's table: its tokens are in its record.
        generated = {int(request_id): (self.engine.get_request(int(request_id)), False)
                     for request_id in result["active_request_ids"]}
        generated.update({record.request_id: (record.merge(), True)
                          for record in result["finished_request_records"]})
        for request_id, (engine_request, finished) in generated.items():
            request = self._requests.get(request_id)
            if request is not None:
                update = self._advance(request, engine_request, finished)
                if update.token_ids or update.text or update.finish_reason:
                    updates.append(update)
        return updates

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling],
                 *, on_update: Callable[[Update], None] | None = None) -> list[Completion]:
        """Run ``prompts`` together to completion (in the prompts' order), with one
        ``sampling`` for all or one per prompt; ``on_update`` sees every update as it
        comes."""
        samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else sampling
        ids = [self.submit(prompt, each) for prompt, each in zip(prompts, samplings, strict=True)]
        completions = [self._requests[request_id].completion for request_id in ids]
        while self.busy:
            for update in self.step():
                if on_update is not None:
                    on_update(update)
        return completions

    # -- bookkeeping ----------------------------------------------------------------------

    def _advance(self, request: _Request, engine_request, engine_finished: bool) -> Update:
        completion = request.completion
        new_tokens = [int(token)
                      for token in engine_request.generated_tokens[len(request.raw_tokens):]]
        request.raw_tokens.extend(new_tokens)
        if self.log_probs:
            completion.log_probs = [float(value) for value in
                                    engine_request.generated_log_probs[:len(request.raw_tokens)]]
        stop_tokens = set(request.sampling.stop_token_ids)
        kept = []
        reason = None
        for token in new_tokens:
            if token in stop_tokens:
                reason = "stop"
                break
            kept.append(token)
        completion.token_ids.extend(kept)
        text, stopped_on_text = self._visible_text(request,
                                                   final=reason is not None or engine_finished)
        if stopped_on_text:
            reason = "stop"
        if reason is None and engine_finished:
            reason = "length"
        update = Update(completion.request_id, kept, text)
        if reason is not None:
            update.finish_reason = self._finish(request, reason, in_engine=not engine_finished)
        return update

    def _visible_text(self, request: _Request, *, final: bool) -> tuple[str, bool]:
        """The text not yet reported, and whether a stop string ended it. Held back: a
        trailing partial UTF-8 character, and a tail that may be the start of a stop
        string, until the next tokens decide."""
        completion = request.completion
        full = self.tokenizer.decode(completion.token_ids)
        stops = request.sampling.stop
        cut = min((index for index in (full.find(stop) for stop in stops) if index >= 0),
                  default=-1)
        if cut >= 0:
            full = full[:cut]
        safe = len(full)
        if cut < 0 and not final:
            safe = _safe_length(full, stops)
        text = full[request.shown:safe]
        request.shown = max(request.shown, safe)
        if cut >= 0 or final:
            completion.text = full
        return text, cut >= 0

    def _finish(self, request: _Request, reason: str, *, in_engine: bool) -> str:
        """Mark ``request`` done; ``in_engine``: the engine still holds it, so end it there
        (a queued request leaves the queue, an active one finishes at the next step)."""
        completion = request.completion
        request_id = completion.request_id
        completion.finish_reason = reason
        if reason == "cancelled":
            completion.text = self.tokenizer.decode(completion.token_ids)
        if in_engine:
            if request_id in self.engine.waiting_request_ids:
                self.engine.waiting_request_ids.remove(request_id)
                del self.engine.requests[request_id]
            else:
                self.engine.stop_word_finished_request_ids.add(request_id)
        del self._requests[request_id]
        return reason


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be shown: not a trailing replacement character (a UTF-8
    sequence cut between tokens) and not a tail that begins some stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = max((size for stop in stops for size in range(1, min(len(stop), end + 1))
                if text[end - size:end] == stop[:size]), default=0)
    return end - held
