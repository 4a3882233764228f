"""The offline default task of SFT and DPO: multi-step arithmetic with worked reasoning.

A problem is ``a ± b ± c`` with operands 1 to 9 and every partial result >= 0 (e.g.
``7 + 8 - 6``): two steps, small enough that a tiny model learns some of it in minutes on a
CPU. Under /think the assistant works it out step by step in its think block
(``7 + 8 = 15`` then ``15 - 6 = 9``); under /no_think the block is empty. The answer is the
number alone (the chat template of ``data/chat.py``).

All problems are enumerated in a fixed order; a permutation seeded by ``seed`` holds out
``HELDOUT`` of them, which no training conversation or preference pair uses. The task metric
is the exact-match accuracy of greedy answers to held-out problems, with reasoning on
(/think) and off (/no_think): :func:`evaluate` for a model in memory,
:func:`evaluate_checkpoint` for a saved one. An accuracy on n problems is a proportion with
sampling noise (at 25%, a standard error of 6 points on 48 problems, 2.7 on 256):
:func:`wilson_interval` gives its 95% interval, :func:`difference_interval` that of the
difference of two.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy

from megatron_hybrid.data import DataError, chat

SYSTEM_PROMPT = "Solve the arithmetic problem."
OPERANDS = range(1, 10)
OPERATORS = ("+", "-")
HELDOUT = 256
"""Held-out problems (of about 1,900)."""
SEED = 0
"""The default split."""
MAX_NEW_TOKENS = 32
"""Decoding budget of an answer: a worked /think reply takes up to 23 tokens."""
MAX_DECODED_TOGETHER = 128
"""Requests the engine decodes at once; more wait for a free slot."""
SPLITS = ("train", "valid")
MODES = ("think", "no_think")
Z_95 = 1.959964
"""The standard normal quantile of a two-sided 95% interval."""


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    operators: tuple[str, ...]
    """One fewer than the operands, each + or -."""

    def question(self) -> str:
        terms = [str(self.operands[0])]
        for operator, operand in zip(self.operators, self.operands[1:]):
            terms += [operator, str(operand)]
        return " ".join(terms)

    def partials(self) -> list[int]:
        """The running result after each step."""
        results, value = [], self.operands[0]
        for operator, operand in zip(self.operators, self.operands[1:]):
            value = value + operand if operator == "+" else value - operand
            results.append(value)
        return results

    @property
    def answer(self) -> int:
        return self.partials()[-1]

    def reasoning(self, partials: list[int] | None = None) -> str:
        """The worked steps, one a line (with ``partials``, those results instead)."""
        partials = partials or self.partials()
        lefts = [self.operands[0], *partials[:-1]]
        return "\n".join(f"{left} {operator} {operand} = {result}" for left, operator, operand,
                         result in zip(lefts, self.operators, self.operands[1:], partials))

    def prompt(self, think: bool) -> tuple[dict, ...]:
        return (chat.system_message(think, SYSTEM_PROMPT),
                {"role": "user", "content": self.question()})

    def conversation(self, think: bool) -> chat.Conversation:
        return chat.Conversation((*self.prompt(think),
                                  {"role": "assistant", "content": str(self.answer)}),
                                 self.reasoning() if think else "")

    def pair(self, think: bool) -> chat.PreferencePair:
        """Chosen: the right answer; rejected: the same steps but for a slip in the last one
        (off by 1 to 3, never negative), carried into the answer."""
        wrong = _slip(self)
        partials = [*self.partials()[:-1], wrong]
        return chat.PreferencePair(
            prompt=self.prompt(think),
            chosen=chat.response(str(self.answer), self.reasoning() if think else ""),
            rejected=chat.response(str(wrong), self.reasoning(partials) if think else ""))


def _slip(problem: Problem) -> int:
    """A deterministic wrong answer near the right one."""
    offset = 1 + sum(problem.operands) % 3
    return problem.answer + offset if problem.answer < offset else problem.answer - offset


def all_problems() -> list[Problem]:
    """Every two-step problem whose partial results are >= 0, in a fixed order."""
    problems = (Problem((a, b, c), operators) for a, b, c in itertools.product(OPERANDS, repeat=3)
                for operators in itertools.product(OPERATORS, repeat=2))
    return [problem for problem in problems if min(problem.partials()) >= 0]


def problems(split: str, seed: int = SEED) -> list[Problem]:
    """The problems of ``split`` (train or valid: the ``HELDOUT`` held out by ``seed``), in
    the seeded order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    every = all_problems()
    order = numpy.random.default_rng(seed).permutation(len(every))
    chosen = order[:HELDOUT] if split == "valid" else order[HELDOUT:]
    return [every[index] for index in chosen]


def conversations(split: str, seed: int = SEED) -> list[chat.Conversation]:
    """Each problem of ``split`` twice: with worked reasoning (/think) and without."""
    return [problem.conversation(think) for problem in problems(split, seed)
            for think in (True, False)]


def preference_pairs(split: str, seed: int = SEED) -> list[chat.PreferencePair]:
    """Each problem of ``split`` as a /think and a /no_think pair (right vs slipped answer)."""
    return [problem.pair(think) for problem in problems(split, seed) for think in (True, False)]


_NUMBER = re.compile(r"\d+")


def extract_answer(generated: str, think: bool) -> int | None:
    """The number a reply generated after the chat template's generation prompt answers, or
    None: up to its end of turn (``<SPECIAL_12>``), it must be reasoning, ``</think>`` and a
    number alone with reasoning on (``think``), a number alone with it off."""
    try:
        _, answer = chat.split_response(generated, think)
    except DataError:
        return None
    return int(answer) if _NUMBER.fullmatch(answer) else None


def answers(model, tokenizer, heldout: list[Problem], *,
            max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Greedy answers of ``model`` to each problem with /think and with /no_think, decoded
    together on Megatron-Core's dynamic engine (``inference.session``), each ending at its end
    of turn (``<SPECIAL_12>``): question, mode, generated text (what follows the generation
    prompt, up to the end of turn), correct. The model's mode is kept."""
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
    from megatron_hybrid.inference.sampling import Sampling
    from megatron_hybrid.inference.session import Session

    asked = [(problem, think) for think in (True, False) for problem in heldout]
    prompts = [chat.prompt_ids(problem.prompt(think), tokenizer) for problem, think in asked]
    sampling = Sampling(max_new_tokens=max_new_tokens,
                        stop_token_ids=(chat.special_ids(tokenizer)[chat.END_OF_TURN],))
    was_training = unwrap(model).training
    try:
        session = Session(model, tokenizer, max_requests=min(len(prompts), MAX_DECODED_TOGETHER),
                          max_sequence_length=max(map(len, prompts)) + max_new_tokens)
        completions = session.generate(prompts, sampling)
    finally:
        unwrap(model).train(was_training)
    return [{"question": problem.question(), "think": think, "generated": completion.text,
             "correct": extract_answer(completion.text, think) == problem.answer}
            for (problem, think), completion in zip(asked, completions)]


def tally(records: list[dict]) -> dict[str, list[int]]:
    """``{"accuracy /think": [correct, asked], "accuracy /no_think": [...]}`` of
    :func:`answers`' records."""
    counts = {}
    for mode in MODES:
        chosen = [record["correct"] for record in records if record["think"] == (mode == "think")]
        counts[f"accuracy /{mode}"] = [sum(chosen), len(chosen)]
    return counts


def accuracy(records: list[dict]) -> dict[str, float]:
    """``{"accuracy /think": x, "accuracy /no_think": y}`` of :func:`answers`' records."""
    return {name: correct / asked if asked else 0.0
            for name, (correct, asked) in tally(records).items()}


def wilson_interval(correct: int, asked: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of the accuracy ``correct / asked`` (95% by default): unlike
    p +- z * sqrt(p (1 - p) / n) it stays in [0, 1] and has a width at 0 or n right answers."""
    if not 0 <= correct <= asked > 0:
        raise ValueError(f"wilson_interval({correct}, {asked}): give 0 <= correct <= asked, "
                         f"asked > 0")
    p, n = correct / asked, asked
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(first: tuple[int, int], second: tuple[int, int], z: float = Z_95
                        ) -> tuple[float, float, float]:
    """``(difference, low, high)`` of the accuracies ``first`` - ``second``, each
    ``(correct, asked)``: Newcombe's interval from the two Wilson intervals. It treats the two
    as independent samples; on the same problems it is wider than a paired interval."""
    (p1, (l1, u1)), (p2, (l2, u2)) = ((c / n, wilson_interval(c, n, z)) for c, n in (first, second))
    difference = p1 - p2
    return (difference, difference - math.hypot(p1 - l1, u2 - p2),
            difference + math.hypot(u1 - p1, p2 - l2))


def evaluate(model, tokenizer, *, samples: int, seed: int = SEED,
             max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, float]:
    """Held-out accuracy of greedy answers to the first ``samples`` held-out problems of the
    ``seed`` split, with reasoning on and off (the model must be whole on this rank)."""
    return accuracy(heldout_answers(model, tokenizer, samples=samples, seed=seed,
                                    max_new_tokens=max_new_tokens))


def heldout_answers(model, tokenizer, *, samples: int, seed: int = SEED,
                    max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """:func:`answers` to the first ``samples`` held-out problems of the ``seed`` split."""
    if not 1 <= samples <= HELDOUT:
        raise ValueError(f"samples={samples}: choose 1 to {HELDOUT} held-out problems")
    return answers(model, tokenizer, problems("valid", seed)[:samples],
                   max_new_tokens=max_new_tokens)


def evaluate_checkpoint(checkpoint_dir: str | Path, *, samples: int = 64, seed: int = SEED,
                        max_new_tokens: int = MAX_NEW_TOKENS, backend: str = "auto"
                        ) -> dict[str, float]:
    """:func:`evaluate` for a saved checkpoint (see :func:`checkpoint_answers`)."""
    return accuracy(checkpoint_answers(checkpoint_dir, samples=samples, seed=seed,
                                       max_new_tokens=max_new_tokens, backend=backend))


def checkpoint_answers(checkpoint_dir: str | Path, *, samples: int = 64, seed: int = SEED,
                       max_new_tokens: int = MAX_NEW_TOKENS, backend: str = "auto"
                       ) -> list[dict]:
    """:func:`heldout_answers` of a saved checkpoint, in this process alone (TP = PP = 1): the
    model and tokenizer as ``inference.loading`` finds them."""
    from megatron_hybrid.inference.loading import loaded_model

    with loaded_model(checkpoint_dir, backend=backend, seed=seed) as (model, tokenizer, _):
        return heldout_answers(model, tokenizer, samples=samples, seed=seed,
                               max_new_tokens=max_new_tokens)
