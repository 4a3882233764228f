"""Rewards of the GRPO stage: verifiable checkers, named in the recipe as ``module:function``.

A checker is a plain Python callable ``checker(prompt, reply) -> float``: ``prompt`` is a
:class:`Prompt` (the messages, the reasoning mode, the reference answer and worked steps),
``reply`` the text the policy generated after the chat template's generation prompt, up to its
end of turn. The recipe names checkers and their weights (``grpo.rewards: {"module:function":
weight}``); a rollout's reward is the weighted sum. Four checkers serve the arithmetic task of
``stages/task.py``: :func:`arithmetic_answer` (the answer is right), :func:`reasoning_format`
(the reply has the form the reasoning mode asks for), and, for partial credit,
:func:`answer_closeness` (how near the answer is) and :func:`worked_steps` (how many numbers of
the worked steps are right). A trained reward model (``stages/reward_model.py``) scores
rollouts too (``grpo.reward_model``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from megatron_hybrid.data import DataError, chat
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.stages import task

Checker = Callable[["Prompt", str], float]
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Prompt:
    """One RL prompt: what the policy is asked, and what a checker compares its reply with."""

    messages: tuple[dict, ...]
    """The conversation up to the assistant's turn (a system message with /think or
    /no_think, then the user's question)."""
    answer: str
    """The reference answer (for the arithmetic task, the number)."""
    steps: tuple[str, ...] = ()
    """The reference's worked steps, one a line (the arithmetic task's ``7 + 8 = 15``)."""

    @property
    def think(self) -> bool:
        return chat.thinking(self.messages)


def arithmetic_answer(prompt: Prompt, reply: str) -> float:
    """1 when the reply answers the task's problem right in its mode's form, else 0."""
    answer = task.extract_answer(reply, prompt.think)
    return float(answer is not None and str(answer) == prompt.answer)


def answer_closeness(prompt: Prompt, reply: str) -> float:
    """Partial credit for a near miss: ``1 / (1 + |answer - reference|)`` for a number in its
    mode's form (1 right, 0.5 one off, 0.25 three off), 0 without one. Denser than
    :func:`arithmetic_answer`: a group of wrong answers still ranks them."""
    answer = task.extract_answer(reply, prompt.think)
    return 0.0 if answer is None else 1 / (1 + abs(answer - int(prompt.answer)))


def worked_steps(prompt: Prompt, reply: str) -> float:
    """/think: the share of the numbers of the problem's worked steps (``7 + 8 = 15``: the
    operands copied from the question and each result) the reasoning writes right, in order,
    over the longer of the two; 0 for a reply not of its mode's form or without steps."""
    try:
        reasoning, _ = chat.split_response(reply, prompt.think)
    except DataError:
        return 0.0
    expected = _NUMBER.findall("\n".join(prompt.steps))
    written = _NUMBER.findall(reasoning)
    if not expected or not written:
        return 0.0
    return sum(map(str.__eq__, expected, written)) / max(len(expected), len(written))


def reasoning_format(prompt: Prompt, reply: str) -> float:
    """1 when the reply has its reasoning mode's form (/think: ``reasoning</think>answer`` with
    reasoning; /no_think: the answer alone), else 0."""
    try:
        reasoning, answer = chat.split_response(reply, prompt.think)
    except DataError:
        return 0.0
    return float(bool(answer) and bool(reasoning) == prompt.think)


def load_checker(name: str) -> Checker:
    """The callable ``module:function`` names, or a one-line ConfigError."""
    module_name, _, function = name.partition(":")
    if not module_name or not function:
        raise ConfigError(f"grpo.rewards: {name!r} is not module:function (e.g. "
                          f"megatron_hybrid.stages.rewards:arithmetic_answer)")
    try:
        checker = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"grpo.rewards: cannot load {name!r} ({type(err).__name__}: {err}): "
                          f"name an importable module and a function in it") from None
    if not callable(checker):
        raise ConfigError(f"grpo.rewards: {name!r} is not callable: name a function "
                          f"(prompt, reply) -> float")
    return checker


def load_checkers(weights: Mapping[str, float]) -> dict[str, tuple[Checker, float]]:
    """Each named checker with its weight."""
    return {name: (load_checker(name), float(weight)) for name, weight in weights.items()}


def score(checkers: Mapping[str, tuple[Checker, float]], prompt: Prompt, reply: str
          ) -> dict[str, float]:
    """Each checker's reward of ``reply`` (unweighted), by name."""
    return {name: float(checker(prompt, reply)) for name, (checker, _) in checkers.items()}


def total(checkers: Mapping[str, tuple[Checker, float]], scores: Mapping[str, float]) -> float:
    """The weighted sum of a reply's checker rewards."""
    return sum(weight * scores[name] for name, (_, weight) in checkers.items())


def task_prompts(split: str, seed: int = task.SEED, problems: int | None = None
                 ) -> list[Prompt]:
    """The arithmetic task's first ``problems`` (None: all) problems of ``split``, each with
    /think and with /no_think."""
    return [Prompt(problem.prompt(think), str(problem.answer),
                   tuple(problem.reasoning().splitlines()))
            for problem in task.problems(split, seed)[:problems] for think in (True, False)]
