"""The OpenAI-compatible server (``megatron-hybrid serve``) on loopback, through the official
openai client, over a tiny checkpoint: greedy completions and chat completions, whole and
streamed, are the uncached loop's (``generate.generate_batch``); concurrent requests share
engine steps and each gets its own answer; a client that leaves, mid-stream or before a whole
reply, cancels its request and the engine holds nothing after; a bad request gets a 4xx with a
one-line message and the next request is served; a failed engine fails its requests and
refuses new ones; the command serves a checkpoint and exits 0 on SIGTERM, and refuses a taken
port before loading."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
import requests

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported

from test_loading import MODEL, checkpoint, hf_dir  # noqa: E402, F401  (the tiny model)

NAME = "tiny"
MAX_REQUESTS = 4
COMPLETION_PROMPTS = ["def hello(world):", "Return the sum of", "class Parser:", "import os",
                      "The quick brown fox", "while True:"]
MESSAGES = [{"role": "user", "content": "What is 7 + 8?"}]
NEW_TOKENS = 12


class Served:
    """A running server (its ``url`` and ``app``, set once it runs) and the uncached loop's
    greedy replies."""

    url: str
    app = None

    def __init__(self, model, tokenizer):
        from megatron_hybrid.data import chat

        self.tokenizer = tokenizer
        end_of_turn = chat.special_ids(tokenizer)[chat.END_OF_TURN]
        self.completions = self.greedy(
            model, [tokenizer.encode(prompt) for prompt in COMPLETION_PROMPTS], {tokenizer.eod})
        self.chats = dict(zip((True, False), self.greedy(
            model, [chat.prompt_ids(chat.with_reasoning(MESSAGES, on), tokenizer)
                    for on in (True, False)], {end_of_turn, tokenizer.eod})))

    def greedy(self, model, prompts, stops) -> list[str]:
        from megatron_hybrid.inference.generate import generate_batch

        replies = generate_batch(model, prompts, NEW_TOKENS, stop=stops)
        return [self.tokenizer.decode([token for token in reply if token not in stops])
                for reply in replies]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=60)

    @property
    def engine(self):
        return self.app.state.engine


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    from megatron_hybrid.inference import server

    with socket.create_server(("127.0.0.1", 0)) as sock:
        http = server.http_server(app)
        thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]})
        thread.start()
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        finally:
            http.should_exit = True
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(checkpoint):
    from megatron_hybrid.inference import server
    from megatron_hybrid.inference.loading import loaded_model
    from megatron_hybrid.inference.session import Session

    with loaded_model(checkpoint, backend="cpu") as (model, tokenizer, model_config):
        served = Served(model, tokenizer)
        session = Session(model, tokenizer, max_requests=MAX_REQUESTS,
                          max_sequence_length=model_config.seq_length)
        served.app = server.create_app(session, model_name=NAME)
        with running(served.app) as served.url:
            yield served


def wait_until(condition, failure: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)


def wait_until_idle(served: Served) -> None:
    """Until the engine holds no request (a cancelled one is released by the next step)."""
    engine = served.engine
    wait_until(lambda: not (engine.active_requests
                            or engine.session.engine.has_unfinished_requests()),
               "the engine still holds requests")


def test_greedy_completion_is_the_uncached_loops(served):
    client = served.client()
    prompt_ids = served.tokenizer.encode(COMPLETION_PROMPTS[0])
    # Temperature 0 is greedy whatever top_p says, as OpenAI's is.
    for prompt, top_p in ((COMPLETION_PROMPTS[0], 1.0), (prompt_ids, 0.5)):
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS,
                                          temperature=0, top_p=top_p)
        (choice,) = reply.choices
        assert choice.text == served.completions[0]
        assert reply.object == "text_completion" and reply.model == NAME
        assert reply.usage.prompt_tokens == len(prompt_ids)
    assert [model.id for model in client.models.list()] == [NAME]
    health = requests.get(served.url.removesuffix("/v1") + "/health", timeout=60).json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_streamed_completion_is_the_whole_one(served):
    chunks = list(served.client().completions.create(
        model=NAME, prompt=COMPLETION_PROMPTS[1], max_tokens=NEW_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    texts = [choice.text for chunk in chunks for choice in chunk.choices]
    assert "".join(texts) == served.completions[1]
    assert len(texts) > 1  # token by token, not all at the end
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= NEW_TOKENS


@pytest.mark.parametrize("reasoning", [True, False])
def test_chat_completion_whole_and_streamed(served, reasoning):
    client = served.client()
    options = {"chat_template_kwargs": {"enable_thinking": reasoning}}
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                           max_tokens=NEW_TOKENS, extra_body=options)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == served.chats[reasoning]
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                                 max_tokens=NEW_TOKENS, stream=True,
                                                 extra_body=options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == \
        served.chats[reasoning]
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_concurrent_requests_share_steps_and_get_their_own_answers(served, monkeypatch):
    session = served.engine.session
    step_sizes = []

    def recorded_step():
        updates = original_step()
        step_sizes.append(len(updates))
        return updates

    original_step = session.step
    monkeypatch.setattr(session, "step", recorded_step)

    indices = range(len(COMPLETION_PROMPTS))  # more than MAX_REQUESTS: some wait their turn
    clients = [served.client() for _ in indices]
    start = threading.Barrier(len(indices))

    def complete(index):
        start.wait()
        return clients[index].completions.create(
            model=NAME, prompt=COMPLETION_PROMPTS[index], max_tokens=NEW_TOKENS,
            temperature=0).choices[0].text

    with ThreadPoolExecutor(len(indices)) as pool:
        texts = list(pool.map(complete, indices))
    assert texts == served.completions
    assert max(step_sizes) > 1  # continuous batching: requests decoded in the same steps
    wait_until_idle(served)


def leave_mid_stream(served, body):
    stream = served.client().completions.create(**body, stream=True)
    next(iter(stream))
    stream.close()


def leave_before_the_reply(served, body):
    """A whole (not streamed) request whose client hangs up while it is generated."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", urlsplit(served.url).port)) as connection:
        connection.sendall(head + payload)
        wait_until(lambda: served.engine.active_requests, "the request was not submitted")


@pytest.mark.parametrize("leave", [leave_mid_stream, leave_before_the_reply])
def test_a_client_that_leaves_cancels_its_request(served, monkeypatch, leave):
    session = served.engine.session
    cancelled = []
    original_cancel = session.cancel
    monkeypatch.setattr(session, "cancel",
                        lambda request_id: (cancelled.append(request_id),
                                            original_cancel(request_id)))
    longest = MODEL.seq_length - len(served.tokenizer.encode(COMPLETION_PROMPTS[2]))
    leave(served, {"model": NAME, "prompt": COMPLETION_PROMPTS[2], "max_tokens": longest,
                   "temperature": 0})
    wait_until(lambda: cancelled, "leaving did not cancel the request")
    wait_until_idle(served)
    test_greedy_completion_is_the_uncached_loops(served)  # and the server goes on serving


BAD_REQUESTS = [
    ("completions", b"{not json", 400, "the body is not valid JSON"),
    ("completions", {"model": NAME, "max_tokens": 4}, 400, "prompt is missing: give it"),
    ("chat/completions", {"model": NAME}, 400, "messages is missing: give it"),
    ("completions", {"prompt": "x", "max_tokens": -3}, 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ("completions", {"prompt": "x", "temperature": -1}, 400,
     "temperature=-1.0: use 0 (greedy) or a positive number"),
    ("completions", {"prompt": "x", "n": 2}, 400, "n=2: this server gives one choice per "),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt: give one prompt, a string or a list"),
    ("completions", {"prompt": [5, 99999]}, 400, "prompt: token id 99999 is outside"),
    ("completions", {"prompt": "x " * 300}, 400, "shorten the prompt"),
    ("completions", {"prompt": "x", "max_tokens": 400}, 400, "ask for fewer tokens"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model 'gpt-4' is not served here"),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "each message must be"),
    ("chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"thinking": 1}}, 400,
     "chat_template_kwargs.thinking: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("endpoint, body, status, message", BAD_REQUESTS)
def test_a_bad_request_gets_a_one_line_4xx_and_the_server_serves_on(served, endpoint, body,
                                                                    status, message):
    sent = {"data": body} if isinstance(body, bytes) else {"json": body}
    response = requests.post(f"{served.url}/{endpoint}", timeout=60,
                             headers={"content-type": "application/json"}, **sent)
    error = response.json()["error"]
    assert response.status_code == status
    assert message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert served.client().completions.create(model=NAME, prompt="x", max_tokens=2).choices


def test_the_openai_client_reports_the_refusal(served):
    with pytest.raises(openai.BadRequestError, match="top_k=5 and top_p=0.5"):
        served.client().completions.create(model=NAME, prompt="x", top_p=0.5,
                                           extra_body={"top_k": 5})


def test_a_seed_repeats_a_sampled_reply(served):
    def sample(seed):
        reply = served.client().completions.create(model=NAME, prompt="x", temperature=1.0,
                                                   max_tokens=NEW_TOKENS, seed=seed)
        return reply.choices[0].text

    assert sample(7) == sample(7) != sample(8)


class BrokenSession:
    """Takes requests; its first step fails, as a broken engine would."""

    max_sequence_length = 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.busy = False


    def submit(self, prompt_ids, sampling) -> int:
        self.busy = True
        return 0

    def step(self):
        raise RuntimeError("an illegal memory access was encountered\nat a kernel")


def test_a_failed_engine_fails_its_requests_and_refuses_new_ones(served):
    from megatron_hybrid.inference import server

    with running(server.create_app(BrokenSession(served.tokenizer), model_name=NAME)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        failure = ("the inference engine failed (RuntimeError: an illegal memory access was "
                   "encountered): restart the server")
        for status in (500, 503):
            with pytest.raises(openai.InternalServerError) as refused:
                client.completions.create(model=NAME, prompt="x", max_tokens=2)
            assert refused.value.status_code == status
            assert refused.value.body["message"] == failure
        health = requests.get(url.removesuffix("/v1") + "/health", timeout=60)
        assert health.status_code == 503


def test_the_command_serves_a_checkpoint_and_stops_on_sigterm(served, checkpoint, tmp_path):
    command = [sys.executable, "-m", "megatron_hybrid", "serve", str(checkpoint), "--port", "0",
               "--backend", "cpu", "--max-requests", "2", "--model-name", NAME]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=environment)
        watchdog = threading.Timer(240, process.kill)
        watchdog.start()
        try:
            line = process.stdout.readline()
            assert line.startswith(f"serving {NAME} at http://127.0.0.1:"), line
            client = openai.OpenAI(base_url=line.split()[-1], api_key="none", max_retries=0)
            reply = client.completions.create(model=NAME, prompt=COMPLETION_PROMPTS[0],
                                              max_tokens=NEW_TOKENS, temperature=0)
            assert reply.choices[0].text == served.completions[0]
            process.send_signal(signal.SIGTERM)
            assert process.wait() == 0
        finally:
            watchdog.cancel()
            process.kill()
        stderr.seek(0)
        assert "Traceback" not in stderr.read()
    assert process.stdout.read() == ""  # the URL is the one line it prints


def test_a_taken_port_is_refused_in_one_line_before_loading(tmp_path, capsys):
    from megatron_hybrid.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "never-loaded"), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"megatron-hybrid serve: error: cannot listen on "
                                       f"127.0.0.1:{port} (Address already in use): choose "
                                       f"another --port or --host\n")
