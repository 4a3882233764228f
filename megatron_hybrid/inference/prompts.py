"""What to generate from: text, token ids or chat messages, turned into prompt token ids.

Sources: ``--prompt TEXT``, ``--prompt-ids 1,2,3`` and ``--prompts FILE.jsonl``, whose lines
are ``{"prompt": "..."}``, ``{"prompt_ids": [1, 2, 3]}`` or ``{"messages": [...]}`` (chat
messages, rendered with Nemotron Nano 2's template, ``data/chat.py``). With a reasoning
setting, text prompts become one user message and every chat prompt gets /think or /no_think;
a chat prompt stops at the end of the assistant's turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_hybrid.data import chat
from megatron_hybrid.errors import ConfigError


@dataclass(frozen=True)
class Prompt:
    text: str | None = None
    ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None


def parse_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: give comma-separated token ids, e.g. "
                          f"1,2,3") from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"--prompt-ids {text!r}: token ids are integers >= 0")
    return ids


def read_jsonl(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file, one object per line (see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            prompts.append(_parse_line(line, f"{path}:{number}"))
    if not prompts:
        raise ConfigError(f"--prompts {path}: the file has no prompts")
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not JSON ({err.msg}): write one object per line") from None
    if not isinstance(record, dict) or len(record.keys() & {"prompt", "prompt_ids",
                                                            "messages"}) != 1:
        raise ConfigError(f"{where}: give exactly one of \"prompt\" (text), \"prompt_ids\" "
                          f"(token ids) or \"messages\" (chat)")
    if "prompt" in record:
        return Prompt(text=str(record["prompt"]))
    if "prompt_ids" in record:
        return Prompt(ids=parse_ids(",".join(map(str, record["prompt_ids"]))))
    messages = record["messages"]
    chat.check_messages(messages)
    return Prompt(messages=tuple(messages))


def prompt_ids(prompt: Prompt, tokenizer, *, reasoning: bool | None) -> list[int]:
    """The token ids to continue: chat prompts (and, with a ``reasoning`` setting, text
    prompts as one user message) through the chat template; otherwise the text or ids as
    they are."""
    if prompt.ids is not None:
        return list(prompt.ids)
    messages = prompt.messages
    if messages is None and reasoning is not None:
        messages = ({"role": "user", "content": prompt.text},)
    if messages is None:
        return tokenizer.encode(prompt.text)
    if reasoning is not None:
        messages = chat.with_reasoning(messages, reasoning)
    return chat.prompt_ids(messages, tokenizer)


def is_chat(prompt: Prompt, *, reasoning: bool | None) -> bool:
    return prompt.messages is not None or (prompt.text is not None and reasoning is not None)
