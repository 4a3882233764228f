"""``megatron-hybrid serve``: an OpenAI-compatible HTTP server over one model."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
from pathlib import Path

from megatron_hybrid.cli import Command
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.inference.loading import DEFAULT_MAX_REQUESTS, loaded_model


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Serve /v1/completions, /v1/chat/completions (streaming by "
                           "server-sent events), /v1/models and /health, with continuous "
                           "batching; on one rank (tp = pp = 1).")
    parser.add_argument("checkpoint",
                        help="a checkpoint (step_* folder) or a Hugging Face NemotronH directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on (default 8000; 0: a free one, printed)")
    parser.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS,
                        help=f"requests decoded together; more wait their turn (default "
                             f"{DEFAULT_MAX_REQUESTS})")
    parser.add_argument("--max-sequence-length", type=int,
                        help="tokens of one request, prompt and reply (default: the model's "
                             "seq_length)")
    parser.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default auto: cuda where a GPU and its kernels are present")
    parser.add_argument("--model-name",
                        help="the model's name in the API (default: the directory's name)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sampler's seed at start (default 0); a request's seed "
                             "restarts it")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad numbers before the model loads, in one line."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: use 1..65535, or 0 for a free one")
    if args.max_requests < 1:
        raise ConfigError(f"--max-requests {args.max_requests}: allow at least 1")
    if args.max_sequence_length is not None and args.max_sequence_length < 2:
        raise ConfigError(f"--max-sequence-length {args.max_sequence_length}: a request needs "
                          f"at least 2 tokens (a prompt token and a reply token)")


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, before the model loads: a taken port
    fails at once, and clients that connect while it loads wait for it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart takes it back at once
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): choose another "
                          f"--port or --host") from None
    sock.listen()
    return sock


def run_serve(args: argparse.Namespace) -> int:
    check_arguments(args)
    sock = listening_socket(args.host, args.port)
    with sock, loaded_model(args.checkpoint, backend=args.backend, seed=args.seed) as (
            model, tokenizer, model_config):
        from megatron_hybrid.inference import server
        from megatron_hybrid.inference.session import Session

        session = Session(model, tokenizer, max_requests=args.max_requests,
                          max_sequence_length=args.max_sequence_length or model_config.seq_length,
                          seed=args.seed)
        name = args.model_name or Path(args.checkpoint).resolve().name
        app = server.create_app(session, model_name=name)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {name} at http://{shown}:{port}/v1", flush=True)
        with _stop_signals_absorbed():
            server.http_server(app).run(sockets=[sock])
    return 0


@contextlib.contextmanager
def _stop_signals_absorbed():
    """uvicorn stops on SIGINT or SIGTERM, then raises the signal again under the handler it
    found; here that handler does nothing, so a stop ends the command normally (exit 0,
    the model unloaded) rather than killing it or raising KeyboardInterrupt."""
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {stop: signal.signal(stop, lambda *_: None) for stop in stops}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


COMMANDS = {
    "serve": Command("serve a model over HTTP, OpenAI-compatible (completions, chat, streaming)",
                     add_serve_arguments, run_serve),
}
