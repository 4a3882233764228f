"""lm-evaluation-harness on the engine: the adapter's loglikelihoods are the full forward's
log_softmax (greedy flags its argmax), rolling windows sum to the windows' log probs,
generate_until is the uncached greedy loop cut at the stop string, and ``megatron-hybrid eval``
runs the repo's example tasks (eval_task/) end to end and refuses bad input in one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported

from test_loading import MODEL, checkpoint, hf_dir  # noqa: E402, F401  (the tiny model)

ROOT = Path(__file__).resolve().parents[2]
TASKS = Path(__file__).resolve().parent / "eval_task"

MAX_LENGTH = 32
"""The adapter's window: short, so texts and contexts cross it."""

TOLERANCE = 1e-5
"""fp32 log probs summed in float64; measured at most 5.2e-6 (the long text: five windows,
-1156 in all)."""

CONTEXTS = ["11 + 5 =", "The river rose through the night, and by morning", "",
            "Return the sum of the two numbers"]
CONTINUATIONS = [" 16", " the lower road was under water.", "Bread rises faster",
                 ", or None when either is missing."]


@pytest.fixture(scope="module")
def lm(checkpoint):
    from megatron_hybrid.inference.evaluation import MegatronHybridLM

    with MegatronHybridLM(checkpoint, backend="cpu", max_length=MAX_LENGTH, batch_size=3) as lm:
        yield lm


def instances(request_type: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, doc={}, arguments=args, idx=index)
            for index, args in enumerate(arguments)]


@torch.no_grad()
def forward_log_probs(model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of a plain full forward: row i is the next token's distribution after
    ``tokens[:i + 1]``."""
    model.eval()
    return torch.log_softmax(model(torch.tensor([tokens]), None, None)[0].float(), -1)


def targets_log_prob(log_probs: torch.Tensor, targets: list[int]) -> float:
    """The sum, in float64, of each row's log prob of its target."""
    return log_probs[torch.arange(len(targets)), torch.tensor(targets)].double().sum().item()


def scored(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The oracle: ``continuation``'s log prob after ``context``, and whether it is argmax."""
    log_probs = forward_log_probs(model, context + continuation)[len(context) - 1:-1]
    greedy = bool((log_probs.argmax(-1) == torch.tensor(continuation)).all())
    return targets_log_prob(log_probs, continuation), greedy


def test_the_adapter_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from megatron_hybrid.inference.evaluation import MegatronHybridLM

    assert get_model("megatron-hybrid") is MegatronHybridLM


def test_loglikelihood_is_the_full_forwards_log_softmax(lm):
    """Text pairs (an empty context takes end of document) through lm_eval's encoding, batched
    more than the engine's three slots."""
    pairs = list(zip(CONTEXTS, CONTINUATIONS))
    answers = lm.loglikelihood(instances("loglikelihood", pairs))
    for (context, continuation), (log_prob, greedy) in zip(pairs, answers):
        if context:
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
        else:
            context_ids, continuation_ids = [lm.eot_token_id], lm.tok_encode(continuation)
        expected, expected_greedy = scored(lm.model, context_ids, continuation_ids)
        assert abs(log_prob - expected) < TOLERANCE, (context, log_prob, expected)
        assert greedy == expected_greedy


def test_greedy_is_true_only_for_the_argmax_continuation(lm):
    from megatron_hybrid.inference.generate import generate_batch

    context = lm.tok_encode(CONTEXTS[1])
    argmax = generate_batch(lm.model, [context], 4)[0]
    other = argmax[:-1] + [(argmax[-1] + 1) % MODEL.vocab_size]
    answers = lm._loglikelihood_tokens([(None, context, argmax), (None, context, other)])
    assert [greedy for _, greedy in answers] == [True, False]
    for (log_prob, _), continuation in zip(answers, (argmax, other)):
        assert abs(log_prob - scored(lm.model, context, continuation)[0]) < TOLERANCE


def test_rolling_loglikelihood_sums_the_windows(lm):
    """A text within one window scores as the whole sequence after end of document; a longer
    one as lm_eval's windows, each a full forward of its own tokens."""
    from lm_eval.utils import get_rolling_token_windows

    short = "Wind turned the old mill's sails."
    long = " ".join(CONTEXTS[1:] + CONTINUATIONS) * 2
    assert len(lm.tok_encode(short)) < MAX_LENGTH < 2 * MAX_LENGTH < len(lm.tok_encode(long))
    totals = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(short,), (long,)]))

    tokens = lm.tok_encode(short)
    assert abs(totals[0] - scored(lm.model, [lm.eot_token_id], tokens)[0]) < TOLERANCE
    expected = 0.0
    for inputs, predicted in get_rolling_token_windows(lm.tok_encode(long), lm.eot_token_id,
                                                       MAX_LENGTH, 1):
        expected += targets_log_prob(forward_log_probs(lm.model, inputs)[-len(predicted):],
                                     predicted)
    assert abs(totals[1] - expected) < TOLERANCE


def test_generate_until_is_the_greedy_loop_cut_at_the_stop_string(lm):
    """Two generation settings (two groups); the stop string is a character the greedy text
    holds, so the cut happens; end of document stops too."""
    from megatron_hybrid.inference.generate import generate_batch

    prompts = [CONTEXTS[0], CONTEXTS[1], CONTEXTS[3], "Each request frees"]
    settings = [{"until": [], "max_gen_toks": 6, "do_sample": False},
                {"until": ["\n"], "max_gen_toks": 10}]
    oracle = []
    for index, prompt in enumerate(prompts):
        new = settings[index % 2]["max_gen_toks"]
        tokens = generate_batch(lm.model, [lm.tok_encode(prompt)], new,
                                stop={lm.eot_token_id})[0]
        if lm.eot_token_id in tokens:
            tokens = tokens[:tokens.index(lm.eot_token_id)]
        oracle.append(lm.text_tokenizer.decode(tokens))
    stop = oracle[1][len(oracle[1]) // 2]
    requests = [(prompt, {**settings[index % 2],
                          "until": settings[index % 2]["until"] + [stop]})
                for index, prompt in enumerate(prompts)]
    texts = lm.generate_until(instances("generate_until", requests))
    cut = [min((text.find(s) for s in request[1]["until"] if s in text), default=len(text))
           for text, request in zip(oracle, requests)]
    assert texts == [text[:end] for text, end in zip(oracle, cut)]
    assert len(texts[1]) < len(oracle[1])  # the stop string cut it


def test_scoring_after_a_generation_that_stopped_on_a_string(lm):
    """The session ends such a request in the engine only at the engine's next step; scoring
    right after must not take its id (the engine's id counter is set to meet it)."""
    from megatron_hybrid.inference.session import Sampling

    context = lm.tok_encode(CONTEXTS[1])
    text = lm.session.generate([context], Sampling(max_new_tokens=6))[0].text
    stopped = lm.session.generate([context], Sampling(max_new_tokens=6,
                                                      stop=(text[len(text) // 2],)))[0]
    assert stopped.finish_reason == "stop"
    lm.session.engine.request_counter.counter = stopped.request_id
    continuation = lm.tok_encode(CONTINUATIONS[1])
    [(log_prob, _)] = lm._loglikelihood_tokens([(None, context, continuation)])
    assert abs(log_prob - scored(lm.model, context, continuation)[0]) < TOLERANCE


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_hybrid", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)


def test_the_eval_command_runs_the_example_tasks(checkpoint, tmp_path):
    """Multiple choice, generation and perplexity, from the task folder; the table on stdout,
    lm_eval's results in --output."""
    output = tmp_path / "results.json"
    result = run_cli("eval", str(checkpoint), "--tasks", str(TASKS), "--limit", "8",
                     "--backend", "cpu", "--max-requests", "4", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    for task in ("arith_choice", "arith_answer", "lines_perplexity"):
        assert f"|{task}" in result.stdout
    metrics = json.loads(output.read_text())["results"]
    assert 0 <= metrics["arith_choice"]["acc,none"] <= 1
    assert 0 <= metrics["arith_choice"]["acc_norm,none"] <= 1
    assert 0 <= metrics["arith_answer"]["exact_match,strip"] <= 1
    assert metrics["lines_perplexity"]["bits_per_byte,none"] > 0


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arith_choise", "--include-path", str(TASKS)],
     "unknown task 'arith_choise': did you mean 'arith_choice'? give a task YAML file, its "
     "folder with --include-path, or a name from `lm-eval ls tasks`"),
    (["--tasks", str(TASKS / "missing.yaml")], "missing.yaml does not exist"),
])
def test_a_bad_task_is_refused_in_one_line(checkpoint, capsys, args, message):
    from megatron_hybrid import cli

    assert cli.main(["eval", str(checkpoint), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-hybrid eval: error: "), lines
    assert message in lines[0]


def test_a_missing_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    from megatron_hybrid import cli

    assert cli.main(["eval", str(tmp_path / "nope"), "--tasks", str(TASKS)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nope does not exist: give a checkpoint" in lines[0], lines
