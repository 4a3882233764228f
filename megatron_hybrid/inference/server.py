"""An OpenAI-compatible HTTP server over a generation :class:`~.session.Session`.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
take and give OpenAI's shapes; ``"stream": true`` sends server-sent events, one chunk per
engine step that gained text, then ``data: [DONE]``. One choice per request (``n=1``), no
logprobs. Chat prompts are rendered with Nemotron Nano 2's template (``data/chat.py``) and stop
at its end of turn; ``chat_template_kwargs: {"enable_thinking": false}`` switches reasoning off.

Threads: the handlers run on uvicorn's event loop; the session, which is not thread-safe, is
driven by one engine thread (:class:`EngineLoop`). It takes submissions and cancellations from
a queue, runs engine steps while the engine holds any request (sleeping on the queue when it
holds none), and hands each request's updates to that request's asyncio queue. Requests that
arrive together therefore share engine steps: continuous batching. A client that disconnects
cancels its request, and the next step frees its state slot.

A bad request gets a 4xx with OpenAI's error object, whose message is one line naming the fix;
the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from megatron_hybrid.data import DataError, chat
from megatron_hybrid.inference.sampling import Sampling
from megatron_hybrid.inference.session import Session, Update

logger = logging.getLogger(__name__)

COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for /v1/completions; a chat reply may fill the sequence."""
ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions")
SHUTDOWN_GRACE_S = 5
"""How long a stopping server waits for open responses before closing them."""


class ApiError(Exception):
    """A request refused with ``status`` and a one-line ``message`` naming the fix."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- the engine thread ------------------------------------------------------------------------

_ACCEPTED = "accepted"
_STOP = "stop"


@dataclass(eq=False)
class RequestStream:
    """One request on its way through the engine thread, which fills ``updates``: first
    :data:`_ACCEPTED` or an :class:`ApiError`, then :class:`Update` objects up to the one
    with a finish reason (or an :class:`ApiError` if the engine fails)."""

    loop: asyncio.AbstractEventLoop
    prompt_ids: list[int]
    sampling: Sampling
    seed: int | None = None
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: int | None = None
    """The session's id, set by the engine thread once submitted."""

    def put(self, item) -> None:
        """Hand ``item`` to the request's handler (called from the engine thread)."""
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
            self.loop.call_soon_threadsafe(self.updates.put_nowait, item)


class EngineLoop:
    """The one thread that calls the session: submissions and cancellations come through a
    thread-safe queue (:meth:`submit`, :meth:`cancel`), updates go out to each request's
    :class:`RequestStream`."""

    def __init__(self, session: Session):
        self.session = session
        self.active_requests = 0
        """Requests the engine holds, as of the end of the engine thread's last round."""
        self.failure: str | None = None
        """Why the engine stopped, once it has failed; every later request is refused."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, RequestStream] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join()

    def submit(self, stream: RequestStream) -> None:
        self._inbox.put(("submit", stream))

    def cancel(self, stream: RequestStream) -> None:
        self._inbox.put(("cancel", stream))

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as err:  # a broken engine: fail every request, refuse new ones
            logger.exception("the engine loop failed")
            cause = (str(err).splitlines() or [""])[0][:200]
            self.failure = (f"the inference engine failed ({type(err).__name__}: {cause}): "
                            f"restart the server")
            for stream in self._streams.values():
                stream.put(ApiError(500, self.failure))
            self._streams.clear()
            while (message := self._inbox.get()) != _STOP:
                kind, stream = message
                if kind == "submit":
                    stream.put(ApiError(503, self.failure))

    def _serve(self) -> None:
        while True:
            # Wait for work only when the session has none (a cancelled request counts until
            # the step that releases it).
            messages = [] if self.session.busy else [self._inbox.get()]
            while not self._inbox.empty():
                messages.append(self._inbox.get_nowait())
            if _STOP in messages:
                return
            for kind, stream in messages:
                (self._submit if kind == "submit" else self._cancel)(stream)
            self._deliver(self.session.step())
            self.active_requests = len(self._streams)

    def _submit(self, stream: RequestStream) -> None:
        if stream.seed is not None:  # the engine has one random stream for all requests
            self.session.reseed(stream.seed)
        try:
            stream.request_id = self.session.submit(stream.prompt_ids, stream.sampling)
        except ValueError as err:  # the session's one-line refusals of bad input
            stream.put(ApiError(400, str(err)))
            return
        self._streams[stream.request_id] = stream
        stream.put(_ACCEPTED)

    def _cancel(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.request_id, None) is not None:  # not finished meanwhile
            self.session.cancel(stream.request_id)

    def _deliver(self, updates: list[Update]) -> None:
        for update in updates:
            stream = self._streams[update.request_id]
            if update.finish_reason is not None:
                del self._streams[update.request_id]
            stream.put(update)


async def _start(engine: EngineLoop, prompt_ids: list[int], sampling: Sampling,
                 seed: int | None) -> RequestStream:
    """Submit a request; once the session has accepted it, its stream."""
    stream = RequestStream(asyncio.get_running_loop(), prompt_ids, sampling, seed)
    engine.submit(stream)
    answer = await stream.updates.get()
    if isinstance(answer, ApiError):
        raise answer
    return stream


async def _updates(engine: EngineLoop, stream: RequestStream) -> AsyncIterator[Update]:
    """The request's updates up to its finish; a reader that leaves early (its client gone)
    cancels the request."""
    finished = False
    try:
        while not finished:
            update = await stream.updates.get()
            if isinstance(update, ApiError):
                raise update
            finished = update.finish_reason is not None
            yield update
    finally:
        if not finished:
            engine.cancel(stream)


# -- OpenAI's shapes --------------------------------------------------------------------------

class _ReasoningOption(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_thinking: bool | None = None


class _GenerationRequest(BaseModel):
    """The fields both endpoints share (OpenAI's names and defaults); others are ignored."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Not OpenAI's; pass it in the client's ``extra_body``."""
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    """``{"include_usage": true}``: a last chunk with the usage."""
    n: int = 1
    seed: int | None = None
    logprobs: Any = None

    def sampling(self, max_tokens: int, stop_token_ids: tuple[int, ...]) -> Sampling:
        if self.n != 1:
            raise ApiError(400, f"n={self.n}: this server gives one choice per request; send "
                                f"n=1 (or {self.n} requests)")
        if self.logprobs:
            raise ApiError(400, "logprobs are not served: leave logprobs out")
        # OpenAI's top_p=1 keeps every token, and temperature 0 is greedy whatever top_p says.
        sampled = self.temperature != 0
        return Sampling(max_new_tokens=max_tokens, temperature=self.temperature,
                        top_k=self.top_k if sampled else 0,
                        top_p=self.top_p if sampled and self.top_p < 1 else 0.0,
                        stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                        stop_token_ids=stop_token_ids)


class CompletionRequest(_GenerationRequest):
    prompt: Any
    """One prompt: a string or a list of token ids."""


class ChatRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: _ReasoningOption | None = None


class _Reply:
    """One response's OpenAI shapes, whole or in chunks: a completion's ``text`` or a chat
    completion's ``message`` (``delta`` in chunks)."""

    def __init__(self, *, model: str, prompt_tokens: int, is_chat: bool):
        self.is_chat = is_chat
        self.prompt_tokens = prompt_tokens
        self.head = {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "created": int(time.time()), "model": model}

    def whole(self, text: str, finish_reason: str | None, completion_tokens: int) -> dict:
        content = ({"message": {"role": "assistant", "content": text}} if self.is_chat
                   else {"text": text})
        return {**self.head, "object": "chat.completion" if self.is_chat else "text_completion",
                "choices": [{"index": 0, **content, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": self.usage(completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False
              ) -> dict:
        delta = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        content = {"delta": delta} if self.is_chat else {"text": text}
        return self._chunk([{"index": 0, **content, "logprobs": None,
                             "finish_reason": finish_reason}])

    def usage_chunk(self, completion_tokens: int) -> dict:
        return {**self._chunk([]), "usage": self.usage(completion_tokens)}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _chunk(self, choices: list) -> dict:
        kind = "chat.completion.chunk" if self.is_chat else "text_completion"
        return {**self.head, "object": kind, "choices": choices}


async def _whole(reply: _Reply, updates: AsyncIterator[Update]) -> dict:
    texts, tokens, finish_reason = [], 0, None
    async for update in updates:
        texts.append(update.text)
        tokens += len(update.token_ids)
        finish_reason = update.finish_reason
    return reply.whole("".join(texts), finish_reason, tokens)


async def _events(reply: _Reply, updates: AsyncIterator[Update], *, include_usage: bool
                  ) -> AsyncIterator[str]:
    """The server-sent events' data: a chunk per update with text or a finish reason (a chat
    starts with the assistant's role), the usage if asked for, then ``[DONE]``; an engine
    failure ends the stream with OpenAI's error object."""
    tokens = 0
    try:
        if reply.is_chat:
            yield json.dumps(reply.chunk("", first=True))
        async for update in updates:
            tokens += len(update.token_ids)
            if update.text or update.finish_reason:
                yield json.dumps(reply.chunk(update.text, update.finish_reason))
    except ApiError as err:
        yield json.dumps(err.body())
        return
    if include_usage:
        yield json.dumps(reply.usage_chunk(tokens))
    yield "[DONE]"


async def _unless_disconnected(request: Request, work: Coroutine) -> Response:
    """``work``'s result as JSON; if the client leaves first, ``work`` is cancelled (and with
    it its request in the engine)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if task.done():
        return JSONResponse(task.result())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody reads it: the client has closed the connection


async def _disconnect(request: Request) -> None:
    # The body has been read: what the server receives next is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the application --------------------------------------------------------------------------

class _Service:
    """The endpoints' work: prompts to token ids, requests to engine submissions, updates to
    OpenAI's responses."""

    def __init__(self, engine: EngineLoop, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.session.tokenizer
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name not in (None, self.model_name):
            raise ApiError(404, f"model {name!r} is not served here: use {self.model_name!r} "
                                f"(GET /v1/models)", code="model_not_found")

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not (isinstance(prompt, list) and all(type(token) is int for token in prompt)):
            raise ApiError(400, "prompt: give one prompt, a string or a list of token ids "
                                "(several prompts: send several requests)")
        outside = [token for token in prompt if not 0 <= token < self.tokenizer.vocab_size]
        if outside:
            raise ApiError(400, f"prompt: token id {outside[0]} is outside the vocabulary "
                                f"(0..{self.tokenizer.vocab_size - 1}): use the model's "
                                f"tokenizer")
        return prompt

    def chat_prompt(self, body: ChatRequest) -> tuple[list[int], tuple[int, ...]]:
        """The chat's prompt ids and stop tokens (the end of turn, the end of document)."""
        messages = body.messages
        options = body.chat_template_kwargs
        try:
            if options is not None and options.enable_thinking is not None:
                messages = chat.with_reasoning(messages, on=options.enable_thinking)
            ids = chat.prompt_ids(messages, self.tokenizer, tools=body.tools)
            end_of_turn = chat.special_ids(self.tokenizer)[chat.END_OF_TURN]
        except DataError as err:
            raise ApiError(400, str(err)) from None
        return ids, (end_of_turn, *self.text_stop_ids())

    def text_stop_ids(self) -> tuple[int, ...]:
        """A completion's stop token: the end of document, if the tokenizer has one."""
        return () if self.tokenizer.eod is None else (self.tokenizer.eod,)

    async def respond(self, request: Request, body: _GenerationRequest, prompt_ids: list[int],
                      max_tokens: int | None, stop_token_ids: tuple[int, ...]) -> Response:
        limit = self.engine.session.max_sequence_length
        if len(prompt_ids) >= limit:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens, and this server's "
                                f"sequences hold {limit} with the reply: shorten the prompt",
                           code="context_length_exceeded")
        sampling = body.sampling(max_tokens or limit - len(prompt_ids), stop_token_ids)
        stream = await _start(self.engine, prompt_ids, sampling, body.seed)
        reply = _Reply(model=self.model_name, prompt_tokens=len(prompt_ids),
                       is_chat=isinstance(body, ChatRequest))
        updates = _updates(self.engine, stream)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return EventSourceResponse(_events(reply, updates, include_usage=usage))
        return await _unless_disconnected(request, _whole(reply, updates))

    def health(self) -> JSONResponse:
        if self.engine.failure:
            return ApiError(503, self.engine.failure).response()
        return JSONResponse({"status": "ok", "model": self.model_name,
                             "active_requests": self.engine.active_requests,
                             "max_sequence_length": self.engine.session.max_sequence_length})

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created,
                                            "owned_by": "megatron-hybrid"}]}


def create_app(session: Session, *, model_name: str) -> FastAPI:
    """The server's application over ``session`` (used by its engine thread alone from now
    on); ``app.state.engine`` is the :class:`EngineLoop`, running while the app is."""
    engine = EngineLoop(session)
    service = _Service(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="megatron-hybrid", lifespan=lifespan)
    app.state.engine = engine
    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _unknown_route)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        return await service.respond(request, body, service.prompt_ids(body.prompt),
                                     body.max_tokens or COMPLETION_MAX_TOKENS,
                                     service.text_stop_ids())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check_model(body.model)
        prompt_ids, stop_token_ids = service.chat_prompt(body)
        return await service.respond(request, body, prompt_ids,
                                     body.max_completion_tokens or body.max_tokens,
                                     stop_token_ids)

    return app


async def _refused(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """The first problem FastAPI found in the body, in one line."""
    problems = err.errors()
    first = problems[0]
    place = ".".join(str(part) for part in first["loc"][1:])
    if first["type"] == "json_invalid":
        message = (f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')}): "
                   f"send a JSON object")
    elif first["type"] == "missing":
        message = f"{place or 'the body'} is missing: give it"
    else:
        message = f"{place or 'the body'}: {first['msg']}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more)"
    return ApiError(400, message, param=place or None).response()


async def _unknown_route(request: Request, err: HTTPException) -> JSONResponse:
    return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}; "
                                     f"this server has {', '.join(ENDPOINTS)}").response()


def http_server(app: FastAPI) -> uvicorn.Server:
    """A uvicorn server for ``app``; ``.run(sockets=[socket])`` serves until interrupted
    (SIGINT, SIGTERM) or its ``should_exit`` is set."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                         timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
