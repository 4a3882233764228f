"""Chat data for SFT, DPO and generation, in Nemotron Nano 2's chat template.

The template is the one NVIDIA publishes with Nemotron Nano 2 (the ``chat_template`` of
nvidia/NVIDIA-Nemotron-Nano-9B-v2's tokenizer_config, printed in its model card), stored
verbatim in ``nemotron_nano_v2_chat_template.jinja`` and rendered as transformers'
``apply_chat_template`` renders it, so SFT, DPO and generation all see the text Nano 2 sees::

    <SPECIAL_10>System\\n{system prompt, toggle removed}\\n
    <SPECIAL_11>User\\n{question}\\n
    <SPECIAL_11>Assistant\\n<think>\\n{reasoning}</think>{answer}\\n<SPECIAL_12>\\n

Reasoning is on unless a system or user message says ``/no_think`` (the last ``/think`` or
``/no_think`` in them decides); the toggles are removed from the rendered text. The template
opens the last assistant turn, and the generation prompt, with ``<think>\\n`` (on) or
``<think></think>`` (off); so the last assistant message's content is
``{reasoning}</think>{answer}`` with reasoning on and the answer alone with it off
(:func:`response`). Earlier assistant turns lose their reasoning:
``<SPECIAL_11>Assistant\\n{answer}\\n<SPECIAL_12>\\n``. Tools go into the system turn
(``<AVAILABLE_TOOLS>[...]</AVAILABLE_TOOLS>``), an assistant's ``tool_calls`` into
``<TOOLCALL>[...]</TOOLCALL>``, tool messages into a user turn
(``<TOOL_RESPONSE>[...]</TOOL_RESPONSE>``). A reply ends at ``<SPECIAL_12>``
(:data:`END_OF_TURN`), where generation stops.

The loss covers the last assistant turn only: its tokens from ``<think>`` through its
``<SPECIAL_12>`` (so the model learns to stop); earlier turns, which the template shows without
their reasoning, are context.

Packing: whole conversations, each followed by the end-of-document token, fill each sequence
in order, never straddling two; ``position_ids`` restart at 0 with each, and
``engine.packed_forward_step`` turns these boundaries into Megatron-Core's ``PackedSeqParams``
(THD), so a packed conversation trains exactly as if alone. ``pack=False`` gives one
conversation per sequence (padded).

JSONL inputs: conversations ``{"messages": [...], "reasoning": "..."}`` whose last message is
the assistant's answer alone; preference pairs ``{"prompt": [messages], "chosen": "...",
"rejected": "..."}`` whose replies are assistant message contents (the chosen one as the
prompt's toggle asks). The default sets are the arithmetic task (``stages/task.py``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megatron_hybrid.data import DataError
from megatron_hybrid.data.tokenizer import CHAT_TOKENS, Tokenizer

TEMPLATE_PATH = Path(__file__).with_name("nemotron_nano_v2_chat_template.jinja")
"""Nemotron Nano 2's chat template, verbatim from nvidia/NVIDIA-Nemotron-Nano-9B-v2's model card
(its tokenizer_config's ``chat_template``)."""
SPECIAL_TOKENS = CHAT_TOKENS
SYSTEM_TURN, TURN, END_OF_TURN, THINK_OPEN, THINK_CLOSE = SPECIAL_TOKENS
"""``<SPECIAL_10>`` opens the system turn, ``<SPECIAL_11>`` a user or assistant turn,
``<SPECIAL_12>`` ends an assistant turn (the stop marker of generation)."""
ASSISTANT = f"{TURN}Assistant\n"
"""The header of an assistant turn; the generation prompt is it and the think block's opening."""
THINK, NO_THINK = "/think", "/no_think"
ROLES = ("system", "user", "assistant", "tool")


# -- the template -----------------------------------------------------------------------------

def render(messages, *, tools: list[dict] | None = None, add_generation_prompt: bool = False
           ) -> str:
    """The template's text of ``messages`` (and ``tools``, JSON schemas), as Hugging Face's
    ``apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=...)``
    renders it; with ``add_generation_prompt``, followed by the opening of the assistant's
    reply, which a model continues."""
    if not messages:
        raise DataError("no messages to render: give at least one")
    check_messages(messages)
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(tool, dict) for tool in tools)):
        raise DataError(f"tools must be a list of JSON schemas (objects); got {str(tools)[:80]}")
    try:
        return _template().render(messages=list(messages), tools=tools,
                                  add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, TypeError) as err:  # e.g. a tool call without a name
        raise DataError(f"the chat template cannot render these messages ({err}): give each "
                        f"tool call a \"name\" and \"arguments\"") from None


@functools.cache
def _template():
    # As transformers compiles chat templates (utils/chat_template_utils.py): sandboxed, blocks
    # trimmed, and a tojson that keeps non-ASCII text and does not escape HTML characters.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = _tojson
    return environment.from_string(TEMPLATE_PATH.read_text(encoding="utf-8"))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def prompt_ids(messages, tokenizer: Tokenizer, *, tools: list[dict] | None = None) -> list[int]:
    """The token ids a model continues to answer ``messages`` (the generation prompt, tokenised
    as training tokenises it)."""
    return tokenizer.encode(render(messages, tools=tools, add_generation_prompt=True))


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of the template's markers (``special_ids(t)[END_OF_TURN]`` stops generation);
    DataError if the tokenizer does not have each as a single token."""
    ids = {token: tokenizer.encode(token) for token in SPECIAL_TOKENS}
    missing = [token for token, encoded in ids.items() if len(encoded) != 1]
    if missing:
        raise DataError(f"the tokenizer has no special token {', '.join(missing)}: the chat "
                        f"template needs {', '.join(SPECIAL_TOKENS)} as single tokens (use "
                        f"tokenizer.kind=default-bpe, or Nemotron Nano 2's tokenizer.json)")
    return {token: encoded[0] for token, encoded in ids.items()}


def thinking(messages) -> bool:
    """Whether the template opens the reply to ``messages`` with reasoning: the last /think or
    /no_think in a system or user message decides; without one, reasoning is on."""
    think = True
    for message in messages:
        if message["role"] in ("system", "user"):
            if THINK in message["content"]:  # tested first, as the template does
                think = True
            elif NO_THINK in message["content"]:
                think = False
    return think


def _toggle(think: bool) -> str:
    return THINK if think else NO_THINK


def system_message(think: bool, prompt: str) -> dict:
    """A system message: ``prompt`` then the reasoning toggle."""
    return {"role": "system", "content": f"{prompt} {_toggle(think)}".strip()}


def with_reasoning(messages, on: bool) -> list[dict]:
    """``messages`` with reasoning switched on or off whatever they say: the toggles removed from
    the system and user messages (the template drops them from the text anyway), and /think or
    /no_think ending the system message (one added when there is none)."""
    check_messages(messages)
    cleared = [{**message, "content": _without_toggles(message["content"])}
               if message["role"] in ("system", "user") else message for message in messages]
    has_system = bool(cleared) and cleared[0]["role"] == "system"
    system = cleared[0] if has_system else {"role": "system", "content": ""}
    return [{**system, **system_message(on, system["content"].strip())}, *cleared[has_system:]]


def _without_toggles(content: str) -> str:
    return content.replace(THINK, "").replace(NO_THINK, "")


def response(answer: str, reasoning: str = "") -> str:
    """An assistant message's content: ``reasoning</think>answer``, or the answer alone without
    reasoning (the template writes the think block's opening itself)."""
    return f"{reasoning}{THINK_CLOSE}{answer}" if reasoning else answer


def split_response(text: str, think: bool) -> tuple[str, str]:
    """(reasoning, answer), each stripped, of a reply as a model writes it after the generation
    prompt or as an assistant message's content, up to its end of turn: ``reasoning</think>
    answer`` with reasoning on (``think``), the answer alone with it off; DataError otherwise."""
    reply = text.split(END_OF_TURN)[0]
    if THINK_OPEN in reply or reply.count(THINK_CLOSE) != int(think):
        form = f"reasoning{THINK_CLOSE}answer" if think else f"the answer alone (no {THINK_CLOSE})"
        raise DataError(f"a {_toggle(think)} reply must be {form}, without {THINK_OPEN} (the "
                        f"template opens the think block); got {reply[:60]!r}")
    reasoning, _, answer = reply.rpartition(THINK_CLOSE)
    return reasoning.strip(), answer.strip()


# -- conversations and pairs ------------------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    """An optional system message, then user (and tool) and assistant turns, the last an
    assistant turn whose content is its answer alone."""
    reasoning: str = ""
    """The last assistant turn's reasoning (required with reasoning on, empty with it off)."""

    @property
    def thinking(self) -> bool:
        return thinking(self.messages)

    @property
    def prompt(self) -> tuple[dict, ...]:
        """The messages before the last assistant turn."""
        return self.messages[:-1]

    @property
    def reply(self) -> str:
        """The last assistant message's content as the template takes it (see :func:`response`)."""
        return response(self.messages[-1]["content"], self.reasoning)


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[dict, ...]
    """Messages ending with a user (or tool) turn."""
    chosen: str
    """The preferred reply, an assistant message's content (see :func:`response`)."""
    rejected: str
    """The dispreferred reply, in the same form."""


def segments(prompt, reply: str) -> list[tuple[str, bool]]:
    """The template's text of ``prompt`` answered with ``reply`` (an assistant message's content)
    as (text, is trained) pieces: the reply's turn is trained from ``<think>`` through its
    ``<SPECIAL_12>``; the prompt, the assistant header and the newline after the turn are not.
    The pieces before the reply's own text are the generation prompt of ``prompt``, so a prompt
    has the same ids in training as in :func:`prompt_ids`."""
    opened = render(prompt, add_generation_prompt=True)
    text = render([*prompt, {"role": "assistant", "content": reply}])
    header_end = opened.rindex(ASSISTANT) + len(ASSISTANT)
    turn_end = text.rindex(END_OF_TURN) + len(END_OF_TURN)
    return [(opened[:header_end], False), (opened[header_end:], True),
            (text[len(opened):turn_end], True), (text[turn_end:], False)]


def tokenize(examples: list[list[tuple[str, bool]]], tokenizer: Tokenizer
             ) -> list[tuple[list[int], list[bool]]]:
    """Per example (a list of template pieces): its token ids and, per token, whether it is
    trained. Pieces are tokenised apart, so a prompt has the same ids in training and when a
    model continues it."""
    tokenized = []
    for pieces in examples:
        ids, trained = [], []
        for text, is_trained in pieces:
            piece = tokenizer.encode(text)
            ids += piece
            trained += [is_trained] * len(piece)
        tokenized.append((ids, trained))
    return tokenized


# -- checks -----------------------------------------------------------------------------------

def check_messages(messages) -> None:
    """Refuse messages the template cannot render: each ``{"role": ..., "content": text}`` (an
    assistant's may add ``tool_calls``), a system message only first."""
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), str)):
            raise DataError(f"each message must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": text (\"\" for none)}}; got {str(message)[:80]}")
        if message["role"] == "system" and index > 0:
            raise DataError(f"message {index + 1} is a system message: move it first (the "
                            f"template reads only a first one)")


def check_conversation(conversation: Conversation) -> None:
    """Refuse a conversation the template cannot render as its toggle says."""
    _check_turns(conversation.messages, last_roles=("assistant",))
    think = conversation.thinking
    if think and not conversation.reasoning.strip():
        raise DataError(f"a {THINK} conversation (reasoning is on unless a system or user "
                        f"message says {NO_THINK}) needs its \"reasoning\": give it, or add "
                        f"{NO_THINK} to the system message")
    if not think and conversation.reasoning:
        raise DataError(f"a {NO_THINK} conversation has \"reasoning\": drop it, or remove "
                        f"{NO_THINK}")
    try:
        _, answer = split_response(conversation.reply, think)
    except DataError as err:
        raise DataError(f"the last assistant message: {err}; its content is the answer alone, "
                        f"its reasoning goes in \"reasoning\"") from None
    if not answer:
        raise DataError("the last assistant message's content (its answer) is empty")


def check_pair(pair: PreferencePair) -> None:
    """Refuse a pair whose chosen reply is not of the form its prompt's toggle asks for (the
    rejected one may be wrong in any way, that one included)."""
    _check_turns(pair.prompt, last_roles=("user", "tool"))
    for name in ("chosen", "rejected"):
        if not (isinstance(getattr(pair, name), str) and getattr(pair, name).strip()):
            raise DataError(f"\"{name}\" must be a non-empty reply (an assistant message's "
                            f"content)")
    think = thinking(pair.prompt)
    try:
        reasoning, answer = split_response(pair.chosen, think)
    except DataError as err:
        raise DataError(f"\"chosen\": {err}") from None
    if not answer or (think and not reasoning):
        raise DataError(f"\"chosen\" must have {'reasoning and ' if think else ''}an answer "
                        f"for a {_toggle(think)} prompt")


def _check_turns(messages, *, last_roles: tuple[str, ...]) -> None:
    check_messages(messages)
    if not messages or messages[-1]["role"] not in last_roles:
        raise DataError(f"the last message's role must be {' or '.join(last_roles)}")


# -- JSONL ------------------------------------------------------------------------------------

def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Conversations from JSONL (one ``{"messages": [...], "reasoning": "..."}`` per line)."""
    def parse(record):
        conversation = Conversation(tuple(record["messages"]), record.get("reasoning", ""))
        check_conversation(conversation)
        return conversation

    return _read_jsonl(path, parse, '{"messages": [...], "reasoning": "..."}')


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs from JSONL (one ``{"prompt": [...], "chosen": ..., "rejected": ...}``
    per line)."""
    def parse(record):
        pair = PreferencePair(tuple(record["prompt"]), record["chosen"], record["rejected"])
        check_pair(pair)
        return pair

    return _read_jsonl(path, parse, '{"prompt": [...], "chosen": "...", "rejected": "..."}')


def _read_jsonl(path, parse, form: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; give a JSONL file of {form} lines")
    items = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                items.append(parse(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, DataError) as err:
                raise DataError(f"{path}:{number}: {_reason(err)}; each line must be {form}") \
                    from None
    if not items:
        raise DataError(f"{path}: no records; each line must be {form}")
    return items


def _reason(err: Exception) -> str:
    return f"missing key {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]


# -- sequences --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sequences:
    """Fixed-length token sequences, one row per sequence of ``seq_length + 1`` tokens (the
    labels are the tokens shifted by one)."""

    ids: numpy.ndarray
    """Token ids, padded with the tokenizer's pad id."""
    trained: numpy.ndarray
    """Whether each token is the assistant's (its prediction is trained)."""
    positions: numpy.ndarray
    """Position within its conversation (restarts at 0 with each conversation)."""

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row`` as the pretraining datasets give a sample: tokens, labels, loss_mask
        (on the labels that are assistant tokens), position_ids, each ``[seq_length]``."""
        ids = torch.from_numpy(self.ids[row].astype(numpy.int64))
        return {"tokens": ids[:-1], "labels": ids[1:],
                "loss_mask": torch.from_numpy(self.trained[row, 1:].astype(numpy.float32)),
                "position_ids": torch.from_numpy(self.positions[row, :-1].astype(numpy.int64))}


def pack(examples: list[tuple[list[int], list[bool]]], *, seq_length: int, eod: int, pad: int,
         name: Callable[[int], str], packed: bool = True) -> Sequences:
    """Examples (token ids, trained flags), each followed by ``eod``, in order into sequences
    of ``seq_length`` (+1 for the shifted labels); ``packed=False``: one example each.
    ``name(index)`` names an example that does not fit."""
    capacity = seq_length + 1
    rows: list[list[int]] = []
    for index, (ids, _) in enumerate(examples):
        if len(ids) > seq_length:
            raise DataError(f"{name(index)} has {len(ids)} tokens, more than the sequence "
                            f"length ({seq_length}): raise train.seq_length or shorten it")
        if not rows or not packed or _row_length(rows[-1], examples) + len(ids) + 1 > capacity:
            rows.append([])
        rows[-1].append(index)
    return _fill(rows, examples, capacity, eod, pad)


def _row_length(row: list[int], examples) -> int:
    return sum(len(examples[index][0]) + 1 for index in row)


def _fill(rows, examples, capacity: int, eod: int, pad: int) -> Sequences:
    ids = numpy.full((len(rows), capacity), pad, dtype=numpy.int32)
    trained = numpy.zeros((len(rows), capacity), dtype=bool)
    positions = numpy.zeros((len(rows), capacity), dtype=numpy.int32)
    for row, members in enumerate(rows):
        start = 0
        for index in members:  # pack() guarantees each member and its EOD fit
            tokens, flags = examples[index]
            end = start + len(tokens)
            ids[row, start:end], trained[row, start:end] = tokens, flags
            ids[row, end] = eod
            positions[row, start:end + 1] = numpy.arange(end + 1 - start)
            start = end + 1
        positions[row, start:] = numpy.arange(capacity - start) + positions[row, start - 1] + 1
    return Sequences(ids, trained, positions)


def pack_conversations(conversations: list[Conversation], tokenizer: Tokenizer, *,
                       seq_length: int, packed: bool = True, seed: int | None = None
                       ) -> Sequences:
    """The conversations packed into sequences; with ``seed``, in a seeded shuffle, so that
    each sequence mixes sources."""
    special_ids(tokenizer)
    examples = tokenize([segments(c.prompt, c.reply) for c in conversations], tokenizer)
    order = (range(len(examples)) if seed is None
             else numpy.random.default_rng(seed).permutation(len(examples)))
    return pack([examples[i] for i in order], seq_length=seq_length, eod=tokenizer.eod,
                pad=tokenizer.pad, packed=packed,
                name=lambda index: f"conversation {order[index] + 1}")


def pair_sequences(pairs: list[PreferencePair], tokenizer: Tokenizer, *,
                   seq_length: int) -> Sequences:
    """Rows 2k and 2k+1: the chosen and the rejected sequence of pair k (one per row)."""
    special_ids(tokenizer)
    examples = tokenize([segments(pair.prompt, reply) for pair in pairs
                         for reply in (pair.chosen, pair.rejected)], tokenizer)
    return pack(examples, seq_length=seq_length, eod=tokenizer.eod, pad=tokenizer.pad,
                packed=False, name=lambda index: f"pair {index // 2 + 1} "
                                                 f"({('chosen', 'rejected')[index % 2]})")


# -- datasets ---------------------------------------------------------------------------------

class EpochOrder:
    """Sample id -> item: every epoch visits all ``num_items`` in a seeded shuffle of its own,
    so a run may take more samples than there are items."""

    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise DataError("no data: the dataset has no conversations or pairs")
        self.num_items = num_items
        self.seed = seed
        self._epoch, self._order = -1, None

    def __call__(self, sample: int) -> int:
        epoch, offset = divmod(sample, self.num_items)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = numpy.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return int(self._order[offset])


class ChatDataset:
    """``num_samples`` samples of packed conversations, keyed like the pretraining datasets
    (tokens, labels, loss_mask, position_ids), for ``datasets.microbatch_iterator``."""

    def __init__(self, sequences: Sequences, *, num_samples: int, seed: int):
        self.sequences = sequences
        self.num_samples = num_samples
        self.order = EpochOrder(len(sequences), seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, sample: int) -> dict[str, torch.Tensor]:
        return self.sequences.sample(self.order(sample))


class PreferenceDataset:
    """``num_samples`` samples of preference pairs: samples 2k and 2k+1 are the chosen and the
    rejected sequence of one pair, so a micro-batch of an even size holds whole pairs. Each
    sample also carries ``ref_logp``: the reference model's log-probability of its response."""

    extra_keys = ("ref_logp",)
    """Keys beyond the pretraining batch's that micro-batches keep."""

    def __init__(self, sequences: Sequences, ref_logps: torch.Tensor, *, num_samples: int,
                 seed: int):
        if len(ref_logps) != len(sequences):
            raise ValueError(f"{len(ref_logps)} reference log-probabilities for "
                             f"{len(sequences)} sequences")
        self.sequences = sequences
        self.ref_logps = ref_logps
        self.num_samples = num_samples
        self.order = EpochOrder(len(sequences) // 2, seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, sample: int) -> dict[str, torch.Tensor]:
        row = 2 * self.order(sample // 2) + sample % 2
        return {**self.sequences.sample(row), "ref_logp": self.ref_logps[row]}
