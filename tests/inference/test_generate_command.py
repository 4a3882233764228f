"""``megatron-hybrid generate``: prompts from every source, decoded together, print the uncached
loop's greedy tokens (``--json``: the new tokens and their text); one prompt streams; chat
prompts (``--reasoning``) stop at the end of the assistant's turn; stop strings cut the text; a
Hugging Face directory generates as its converted checkpoint;
TP=2 under torchrun prints what one rank does (bad input: the catalogue,
``tests/cli/test_bad_inputs.py``)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import rank_environment
from test_loading import checkpoint, hf_dir  # noqa: F401  (a tiny model, HF and converted)

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported

NEW_TOKENS = 6
IDS = [5, 6, 7, 300, 12]
TEXT = "def hello(world):"
QUESTION = "What is 7 + 8?"


@pytest.fixture(scope="module")
def oracle(checkpoint):  # noqa: F811
    """The uncached loop's greedy replies, stops excluded: raw ids, raw text, a chat turn."""
    from megatron_hybrid.data import chat
    from megatron_hybrid.inference.generate import generate_batch
    from megatron_hybrid.inference.loading import loaded_model

    with loaded_model(checkpoint, backend="cpu") as (model, tokenizer, _):
        end_of_turn = chat.special_ids(tokenizer)[chat.END_OF_TURN]
        prompts = [IDS, tokenizer.encode(TEXT),
                   chat.prompt_ids(chat.with_reasoning(
                       [{"role": "user", "content": QUESTION}], False), tokenizer)]
        stops = {tokenizer.eod, end_of_turn}
        replies = generate_batch(model, prompts, NEW_TOKENS, stop=stops)
        replies = [[token for token in reply if token not in stops] for reply in replies]
        return {"replies": replies, "texts": [tokenizer.decode(reply) for reply in replies]}


def generate(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    command = [*launcher, "-m", "megatron_hybrid", "generate", *map(str, args),
               "--backend", "cpu", "--max-new-tokens", str(NEW_TOKENS)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**rank_environment(nproc), "PYTHONPATH": os.getcwd()})


def json_lines(result) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_prompts_from_every_source_decode_together_as_the_uncached_loop(checkpoint, oracle,
                                                                         tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": QUESTION}]}) + "\n")
    lines = json_lines(generate(checkpoint, "--prompt-ids", ",".join(map(str, IDS)),
                                "--prompt", TEXT, "--prompts", prompts, "--reasoning", "off",
                                "--json"))
    # In order: --prompt (made a chat turn by --reasoning), --prompt-ids, then the file.
    assert len(lines) == 3
    assert [line["tokens"] for line in lines[1:]] == [oracle["replies"][0], oracle["replies"][2]]
    assert [line["text"] for line in lines[1:]] == [oracle["texts"][0], oracle["texts"][2]]


def test_one_prompt_streams_its_text_and_stop_strings_cut_it(checkpoint, hf_dir, oracle):
    streamed = generate(hf_dir, "--prompt", TEXT)  # the Hugging Face directory it came from
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert streamed.stdout == oracle["texts"][1] + "\n"
    text = oracle["texts"][1]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    (line,) = json_lines(generate(checkpoint, "--prompt", TEXT, "--stop", stop, "--json"))
    assert line["text"] == text[:text.index(stop)]


def test_tensor_parallel_under_torchrun_prints_what_one_rank_does(checkpoint, oracle):
    lines = json_lines(generate(checkpoint, "--tp", 2, "--prompt", TEXT, "--prompt-ids",
                                ",".join(map(str, IDS)), "--json", nproc=2))
    assert [line["tokens"] for line in lines] == [oracle["replies"][1], oracle["replies"][0]]
