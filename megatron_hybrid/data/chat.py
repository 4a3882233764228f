"""Chat data for SFT and DPO, with the reasoning toggle of Nemotron Nano 2.

The template (ChatML with a think block, as Nano 2)::

    <|im_start|>system\\n{system prompt} /think<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n<think>{reasoning}</think>{answer}<|im_end|>

``/think`` or ``/no_think`` ends the system prompt; with ``/no_think`` the think block is empty
(``<think></think>``). In multi-turn conversations only the last assistant turn carries its
reasoning (earlier turns show an empty block, as Nano 2 strips reasoning from the history).
The loss covers the assistant's tokens only: from ``<think>`` to its ``<|im_end|>``.

Packing: whole conversations, each followed by the end-of-document token, fill each sequence
in order; a conversation never straddles two sequences, and ``position_ids`` restart at 0 with
each conversation: they mark the document boundaries. SFT trains packed sequences through
``engine.packed_forward_step``, which turns those boundaries into Megatron-Core's
``PackedSeqParams`` (THD, ``cu_seqlens``): the Mamba mixers get them as ``seq_idx`` (no
convolution tap or state across a boundary) and the core attention attends within each
document only, so a packed conversation is trained exactly as if it were alone.
``pack=False`` gives one conversation per sequence (padded).

JSONL inputs: conversations ``{"messages": [{"role": ..., "content": ...}, ...],
"reasoning": "..."}``; preference pairs ``{"prompt": [messages], "chosen": "...",
"rejected": "..."}`` whose responses are complete assistant turns, think block included (the
chosen one's as the toggle asks). The offline default sets are the arithmetic task of
``megatron_hybrid/stages/task.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from megatron_hybrid.data import DataError
from megatron_hybrid.data.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = (IM_START, IM_END, THINK_OPEN, THINK_CLOSE)
THINK, NO_THINK = "/think", "/no_think"
ROLES = ("system", "user", "assistant")


# -- conversations and the template -----------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    """A system message ending in /think or /no_think, then user and assistant turns, the
    last an assistant turn."""
    reasoning: str = ""
    """The last assistant turn's reasoning (required with /think, empty with /no_think)."""

    @property
    def thinking(self) -> bool:
        return thinking(self.messages)

    @property
    def prompt(self) -> tuple[dict, ...]:
        """The messages before the last assistant turn."""
        return self.messages[:-1]


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[dict, ...]
    """A system message ending in /think or /no_think, then turns ending with a user turn."""
    chosen: str
    """The preferred assistant turn, think block included (``<think>...</think>answer``)."""
    rejected: str
    """The dispreferred assistant turn, in the same form."""


def thinking(messages) -> bool:
    """Whether the system prompt of ``messages`` asks for reasoning (/think) or not (/no_think)."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"].rstrip() if has_system else ""
    if system.endswith(NO_THINK):
        return False
    if system.endswith(THINK):
        return True
    raise DataError(f"the first message must be a system prompt ending in {THINK} or {NO_THINK} "
                    f"(the reasoning toggle); got {str(messages[:1])[:80]}")


def system_message(think: bool, prompt: str) -> dict:
    """A system message: ``prompt`` then the reasoning toggle."""
    return {"role": "system", "content": f"{prompt} {THINK if think else NO_THINK}"}


def response(answer: str, reasoning: str = "") -> str:
    """An assistant turn's text: the think block (empty without reasoning), then the answer."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"


def split_response(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant turn that opens with a closed think block."""
    match = re.match(re.escape(THINK_OPEN) + "(.*?)" + re.escape(THINK_CLOSE), text, re.S)
    if match is None:
        raise DataError(f"an assistant response must open with {THINK_OPEN}...{THINK_CLOSE}; "
                        f"got {text[:60]!r}")
    return match.group(1), text[match.end():]


def prompt_text(messages) -> str:
    """The turns of ``messages`` and the opening of the assistant's reply (what a model
    continues when it answers)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages) + \
        f"{IM_START}assistant\n"


def segments(conversation: Conversation) -> list[tuple[str, bool]]:
    """The template text of ``conversation`` as (text, is the assistant's) pieces."""
    pieces, pending = [], []
    last = len(conversation.messages) - 1
    for index, message in enumerate(conversation.messages):
        if message["role"] != "assistant":
            pending.append(message)
            continue
        reasoning = conversation.reasoning if index == last else ""
        separator = "\n" if pieces else ""  # after the previous assistant turn's <|im_end|>
        pieces.append((separator + prompt_text(pending), False))
        pieces.append((response(message["content"], reasoning) + IM_END, True))
        pending = []
    return pieces


def render(conversation: Conversation) -> str:
    return "".join(text for text, _ in segments(conversation))


def tokenize(examples: list[list[tuple[str, bool]]], tokenizer: Tokenizer
             ) -> list[tuple[list[int], list[bool]]]:
    """Per example (a list of template pieces): its token ids and, per token, whether it is
    the assistant's (trained). Pieces are tokenised apart, so a prompt has the same ids in
    training and when a model continues it."""
    tokenized = []
    for pieces in examples:
        ids, trained = [], []
        for text, is_assistant in pieces:
            piece = tokenizer.encode(text)
            ids += piece
            trained += [is_assistant] * len(piece)
        tokenized.append((ids, trained))
    return tokenized


def prompt_ids(messages, tokenizer: Tokenizer) -> list[int]:
    """The token ids a model continues to answer ``messages`` (as training tokenises them)."""
    return tokenizer.encode(prompt_text(messages))


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of the template's special tokens; DataError if the tokenizer lacks one."""
    ids = {token: tokenizer.encode(token) for token in SPECIAL_TOKENS}
    missing = [token for token, encoded in ids.items() if len(encoded) != 1]
    if missing:
        raise DataError(f"the tokenizer has no special token {', '.join(missing)}: chat data "
                        f"needs {', '.join(SPECIAL_TOKENS)} (the default tokenizer has them)")
    return {token: encoded[0] for token, encoded in ids.items()}


def pair_pieces(pair: PreferencePair) -> list[list[tuple[str, bool]]]:
    """The chosen and the rejected sequence of ``pair`` as template pieces."""
    prompt = prompt_text(pair.prompt)
    return [[(prompt, False), (answer + IM_END, True)] for answer in (pair.chosen, pair.rejected)]


# -- checks -----------------------------------------------------------------------------------

def check_conversation(conversation: Conversation) -> None:
    """Refuse a conversation the template cannot render as its toggle says."""
    _check_messages(conversation.messages, last_role="assistant")
    if conversation.thinking and not conversation.reasoning.strip():
        raise DataError(f"a {THINK} conversation needs its \"reasoning\": give it, or end the "
                        f"system prompt with {NO_THINK}")
    if not conversation.thinking and conversation.reasoning:
        raise DataError(f"a {NO_THINK} conversation has \"reasoning\": drop it, or end the "
                        f"system prompt with {THINK}")


def check_pair(pair: PreferencePair) -> None:
    """Refuse a pair whose chosen response does not open with the think block its toggle asks
    for (the rejected one may be wrong in any way, that one included)."""
    _check_messages(pair.prompt, last_role="user")
    think = thinking(pair.prompt)
    reasoning, _ = split_response(pair.chosen)
    if bool(reasoning.strip()) != think:
        raise DataError(f"\"chosen\" must open with {'a non-empty' if think else 'an empty'} "
                        f"think block for a {THINK if think else NO_THINK} prompt")
    if not (isinstance(pair.rejected, str) and pair.rejected):
        raise DataError("\"rejected\" must be a non-empty response")


def _check_messages(messages, *, last_role: str) -> None:
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), str)):
            raise DataError(f"each message must be {{\"role\": one of {', '.join(ROLES)}, "
                            f"\"content\": text}}; got {str(message)[:80]}")
    thinking(messages)
    if len(messages) < 2 or messages[-1]["role"] != last_role:
        raise DataError(f"the messages must end with a {last_role} turn after the system prompt")


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
    examples = tokenize([segments(c) for c in conversations], tokenizer)
    order = (range(len(examples)) if seed is None
             else numpy.random.default_rng(seed).permutation(len(examples)))
    return pack([examples[i] for i in order], seq_length=seq_length, eod=tokenizer.eod,
                pad=tokenizer.pad, packed=packed,
                name=lambda index: f"conversation {order[index] + 1}")


def pair_sequences(pairs: list[PreferencePair], tokenizer: Tokenizer, *,
                   seq_length: int) -> Sequences:
    """Rows 2k and 2k+1: the chosen and the rejected sequence of pair k (one per row)."""
    special_ids(tokenizer)
    examples = tokenize([pieces for pair in pairs for pieces in pair_pieces(pair)], tokenizer)
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
