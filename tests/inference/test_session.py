"""The generation session over the dynamic engine: greedy completions equal the uncached
loop's with more prompts than request slots; sampling follows its seed; stop strings and stop
tokens end a request without being shown, and streamed text is exactly the final text; a
request stopped or cancelled mid-stream frees its slot while others prefill and decode, and
the Mamba state slots it leaves are reset for the next requests; bad requests fail in one
line."""

import pytest
from test_engine import MODEL, PROMPTS

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    process_groups.seed_everything(0)
    yield build_model(MODEL, ModelLayout(), backend="cpu")
    process_groups.destroy_distributed()


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer

    return load_tokenizer(TokenizerConfig(vocab_size=MODEL.vocab_size))


@pytest.fixture(scope="module")
def oracle(model):
    from megatron_hybrid.inference.generate import generate_batch

    return generate_batch(model, PROMPTS, NEW_TOKENS)


def new_session(model, tokenizer, max_requests=2):
    from megatron_hybrid.inference.session import Session

    return Session(model, tokenizer, max_requests=max_requests, max_sequence_length=64)


def greedy(**changes):
    from megatron_hybrid.inference.session import Sampling

    return Sampling(**{"max_new_tokens": NEW_TOKENS, **changes})


def test_greedy_completions_equal_the_uncached_loop_with_requests_waiting_for_slots(
        model, tokenizer, oracle):
    session = new_session(model, tokenizer, max_requests=2)
    completions = session.generate(PROMPTS, greedy())
    assert [completion.token_ids for completion in completions] == oracle
    assert {completion.finish_reason for completion in completions} == {"length"}
    assert [completion.text for completion in completions] == [
        tokenizer.decode(tokens) for tokens in oracle]
    assert not session.busy and not session.engine.has_unfinished_requests()


def test_sampling_follows_its_seed(model, tokenizer):
    session = new_session(model, tokenizer, max_requests=4)
    sampling = greedy(temperature=1.0, top_k=50)
    runs = []
    for seed in (1, 1, 2):
        session.reseed(seed)
        runs.append([c.token_ids for c in session.generate(PROMPTS, sampling)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def streamed(session, prompts, sampling):
    texts, reasons = {}, {}

    def collect(update):
        texts[update.request_id] = texts.get(update.request_id, "") + update.text
        if update.finish_reason:
            reasons[update.request_id] = update.finish_reason

    completions = session.generate(prompts, sampling, on_update=collect)
    return completions, [texts.get(c.request_id, "") for c in completions]


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(model, tokenizer, oracle):
    session = new_session(model, tokenizer)
    full = tokenizer.decode(oracle[0])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    completions, texts = streamed(session, PROMPTS[:2], greedy(stop=(stop,)))
    first = completions[0]
    assert first.finish_reason == "stop"
    assert first.text == full[:full.index(stop)]
    assert texts[0] == first.text  # nothing of the stop string went out, then was taken back
    # The other request is untouched.
    assert completions[1].token_ids == oracle[1] and texts[1] == completions[1].text


def test_a_stop_token_ends_its_request_only(model, tokenizer, oracle):
    session = new_session(model, tokenizer)
    stop_token = oracle[1][3]
    completions = session.generate(PROMPTS[:2], greedy(stop_token_ids=(stop_token,)))
    assert completions[1].token_ids == oracle[1][:3]
    assert completions[1].finish_reason == "stop"
    assert completions[0].token_ids == oracle[0][:oracle[0].index(stop_token)] \
        if stop_token in oracle[0] else oracle[0]


def test_cancelled_and_stopped_requests_free_their_slots_for_the_next(model, tokenizer, oracle):
    session = new_session(model, tokenizer, max_requests=2)
    first = session.submit(PROMPTS[0], greedy())
    second = session.submit(PROMPTS[1], greedy())
    for _ in range(3):
        session.step()
    session.cancel(first)
    # The next prompts prefill while the cancelled request is finished in the engine; one of
    # them reuses its Mamba state slot, which must start from zero.
    later = [session.submit(prompt, greedy()) for prompt in PROMPTS[2:]]
    results = {}
    while session.busy:
        for update in session.step():
            results.setdefault(update.request_id, []).extend(update.token_ids)
    assert results[second][-(NEW_TOKENS - 3):] == oracle[1][3:]
    assert [results[request] for request in later] == oracle[2:]
    assert not session.engine.has_unfinished_requests()
    assert session.engine.context.total_request_count == 0
    # Every slot is free again, and the same prompts decode as they did.
    assert [c.token_ids for c in session.generate(PROMPTS, greedy())] == oracle


@pytest.mark.parametrize("changes, message", [
    ({"max_new_tokens": 0}, r"^max_new_tokens=0: ask for at least 1 token$"),
    ({"temperature": -1.0}, r"^temperature=-1.0: use 0 \(greedy\) or a positive number$"),
    ({"temperature": 1.0, "top_k": 5, "top_p": 0.9},
     r"^top_k=5 and top_p=0.9: .* set the other to 0$"),
    ({"top_k": 5}, r"^top_k=5, top_p=0.0 at temperature 0: sampling needs a temperature > 0"),
    ({"max_new_tokens": 60}, r"^a prompt of 40 tokens \+ max_new_tokens=60 is 100 tokens, "
                             r"over this session's 64: shorten the prompt or ask for fewer "
                             r"tokens$"),
])
def test_a_bad_request_is_refused_in_one_line(model, tokenizer, changes, message):
    session = new_session(model, tokenizer)
    with pytest.raises(ValueError, match=message):
        session.submit(PROMPTS[0], greedy(**changes))
    assert not session.busy


@pytest.mark.parametrize("layout, message", [
    ({"context_parallel_size": 2, "sequence_parallel": False},
     r"^context parallel \(cp=2\) splits a sequence over ranks for training; decode with cp=1 "
     r"\(tp and pp work\)$"),
    ({"context_parallel_size": 1, "sequence_parallel": True},
     r"^sequence parallel is a training layout; decode without it \(tp and pp work\)$"),
])
def test_training_layouts_are_refused_at_decode_in_one_line(layout, message):
    from types import SimpleNamespace

    from megatron_hybrid.errors import ConfigError
    from megatron_hybrid.inference.engine import check_decode_layout

    with pytest.raises(ConfigError, match=message):
        check_decode_layout(SimpleNamespace(config=SimpleNamespace(**layout)))
