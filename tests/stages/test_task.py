"""The arithmetic task: deterministic problems and splits, worked reasoning, the preference
pairs, exact-match answer extraction, and the accuracy of a real tiny model's greedy answers."""

import math
import re

import pytest
from test_sft import model_engine  # noqa: F401  (fixture)

from megatron_hybrid.data import chat
from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer
from megatron_hybrid.stages import task


def test_problems_are_deterministic_and_the_split_holds_problems_out():
    every = task.all_problems()
    assert every == task.all_problems() and len(set(every)) == len(every) == 1899
    train, heldout = task.problems("train"), task.problems("valid")
    assert (train, heldout) == (task.problems("train"), task.problems("valid"))
    assert len(heldout) == task.HELDOUT and len(train) + len(heldout) == len(every)
    assert not set(train) & set(heldout)
    assert task.problems("valid", seed=1) != heldout  # the seed chooses the split
    with pytest.raises(ValueError, match="split='test': choose one of train, valid"):
        task.problems("test")


def test_every_problem_is_two_steps_of_small_numbers_with_a_nonnegative_answer():
    for problem in task.all_problems():
        assert all(1 <= operand <= 9 for operand in problem.operands)
        assert problem.answer == eval(problem.question()) >= 0  # plain Python arithmetic
        assert min(problem.partials()) >= 0


def test_reasoning_is_worked_under_think_and_empty_under_no_think():
    problem = task.Problem((7, 8, 6), ("+", "-"))
    think, no_think = problem.conversation(True), problem.conversation(False)
    assert chat.render([*think.prompt, {"role": "assistant", "content": think.reply}]) == (
        "<SPECIAL_10>System\nSolve the arithmetic problem.\n"
        "<SPECIAL_11>User\n7 + 8 - 6\n"
        "<SPECIAL_11>Assistant\n<think>\n7 + 8 = 15\n15 - 6 = 9</think>9\n<SPECIAL_12>\n")
    assert chat.render([*no_think.prompt, {"role": "assistant", "content": no_think.reply}]) \
        .endswith("<SPECIAL_11>Assistant\n<think></think>9\n<SPECIAL_12>\n")
    conversations = task.conversations("valid")
    assert len(conversations) == 2 * task.HELDOUT
    for conversation in conversations:
        chat.check_conversation(conversation)
        steps = conversation.reasoning.splitlines()
        assert len(steps) == (2 if conversation.thinking else 0)
        for step in steps:  # every worked step is right
            left, result = step.split(" = ")
            assert eval(left) == int(result)


def test_pairs_prefer_the_right_answer_over_a_slip_in_the_last_step():
    problem = task.Problem((5, 6, 1), ("+", "+"))
    pair = problem.pair(True)
    assert pair.chosen == "5 + 6 = 11\n11 + 1 = 12</think>12"
    assert pair.rejected == "5 + 6 = 11\n11 + 1 = 11</think>11"
    assert problem.pair(False).chosen == "12"
    pairs = task.preference_pairs("valid")
    assert len(pairs) == 2 * task.HELDOUT
    for pair, problem in zip(pairs[::2], task.problems("valid")):
        chat.check_pair(pair)
        assert task.extract_answer(pair.chosen, True) == problem.answer
        wrong = task.extract_answer(pair.rejected, True)
        assert wrong != problem.answer and wrong >= 0 and abs(wrong - problem.answer) <= 3


@pytest.mark.parametrize("generated, think, answer", [
    ("7 + 8 = 15\n15 - 6 = 9</think>9\n<SPECIAL_12>", True, 9),
    ("12\n<SPECIAL_12>", False, 12),
    (" 12 \n<SPECIAL_12>", False, 12),  # surrounding space is not the answer
    ("12", False, 12),  # out of tokens right after the answer
    ("12\n<SPECIAL_12>13", False, 12),  # what follows the turn is not the answer
    ("12 apples\n<SPECIAL_12>", False, None),  # not a number alone
    ("-3\n<SPECIAL_12>", False, None),  # answers are never negative
    ("\n<SPECIAL_12>", False, None),
    ("12\n<SPECIAL_12>", True, None),  # reasoning on, but no think block closed
    ("7 + 8 = 15\n<SPECIAL_12>", True, None),  # think block never closed
    ("7 + 8 = 15</think>12\n<SPECIAL_12>", False, None),  # reasoning though it was off
])
def test_answer_extraction_is_exact(generated, think, answer):
    assert task.extract_answer(generated, think) == answer


def test_evaluate_measures_a_real_model_with_reasoning_on_and_off(model_engine):  # noqa: F811
    model = model_engine[0][0]
    tokenizer = load_tokenizer(TokenizerConfig())
    heldout = task.problems("valid")[:3]
    records = task.answers(model, tokenizer, heldout, max_new_tokens=5)
    assert [(r["question"], r["think"]) for r in records] == [
        (p.question(), think) for think in (True, False) for p in heldout]
    from megatron_hybrid.inference.generate import generate

    for record, (problem, think) in zip(records, [(p, t) for t in (True, False) for p in heldout]):
        alone = generate(model, chat.prompt_ids(problem.prompt(think), tokenizer), 5)
        assert record["generated"] == tokenizer.decode(alone)
        assert record["correct"] is False  # an untrained model
    scores = task.evaluate(model, tokenizer, samples=3, max_new_tokens=5)
    assert scores == {"accuracy /think": 0.0, "accuracy /no_think": 0.0}
    assert task.accuracy([{**records[0], "correct": True}, *records[1:]]) == {
        "accuracy /think": 1 / 3, "accuracy /no_think": 0.0}
    with pytest.raises(ValueError, match=re.escape("samples=0: choose 1 to 256 held-out")):
        task.evaluate(model, tokenizer, samples=0)


def test_tally_counts_right_answers_per_mode():
    records = [{"think": True, "correct": True}, {"think": True, "correct": False},
               {"think": False, "correct": True}]
    assert task.tally(records) == {"accuracy /think": [1, 2], "accuracy /no_think": [1, 1]}
    assert task.accuracy(records) == {"accuracy /think": 0.5, "accuracy /no_think": 1.0}


def test_wilson_interval_covers_the_true_accuracy_95_percent_of_the_time():
    """Exact coverage over the binomial distribution, on the task's sizes: a wrong width (say
    z = 1, 68%) or a wrong centre fails it."""
    for asked in (48, 256):
        for true in (0.05, 0.25, 0.5):
            coverage = sum(math.comb(asked, correct) * true ** correct
                           * (1 - true) ** (asked - correct)
                           for correct in range(asked + 1)
                           if task.wilson_interval(correct, asked)[0] <= true
                           <= task.wilson_interval(correct, asked)[1])
            assert 0.925 < coverage < 0.975, (asked, true, coverage)
    low, high = task.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(task.Z_95 ** 2 / (10 + task.Z_95 ** 2))
    assert task.wilson_interval(3, 10) == pytest.approx(
        tuple(1 - bound for bound in reversed(task.wilson_interval(7, 10))))
    with pytest.raises(ValueError, match="give 0 <= correct <= asked, asked > 0"):
        task.wilson_interval(3, 0)


def test_difference_interval_is_newcombes():
    """Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80, method 10."""
    difference, low, high = task.difference_interval((56, 70), (48, 80))
    assert difference == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
