"""Chat data: Nemotron Nano 2's chat template rendered as transformers renders it, the
reasoning toggles, the last-turn loss mask, packing, and JSONL input (the offline default sets
are tests/stages/test_task.py's)."""

import json
import re

import numpy
import pytest
import torch

from megatron_hybrid.data import DataError, chat
from megatron_hybrid.data.tokenizer import SPECIAL_TOKENS, TokenizerConfig, load_tokenizer

SYSTEM = "You are a concise assistant for the Python standard library."
TOOLS = [{"type": "function", "function": {
    "name": "convert", "description": "Degrees <°C> to °F & back",
    "parameters": {"type": "object", "properties": {"value": {"type": "number"}},
                   "required": ["value"]}}},
         {"name": "now", "description": "The time", "parameters": {"type": "object"}}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerConfig())


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    """A transformers tokenizer whose chat_template is the template's text (no download)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.json_path))
    hf.chat_template = chat.TEMPLATE_PATH.read_text(encoding="utf-8")
    return hf


def conversation(think: bool, question: str = "What does `json.dumps` do?",
                 answer: str = "Serialize obj to a JSON formatted str.") -> chat.Conversation:
    return chat.Conversation(
        (chat.system_message(think, SYSTEM), {"role": "user", "content": question},
         {"role": "assistant", "content": answer}),
        "It lives in the json module." if think else "")


def text(conversation: chat.Conversation) -> str:
    """The whole conversation as the template renders it."""
    return chat.render([*conversation.prompt, {"role": "assistant", "content": conversation.reply}])


def test_template_text_with_the_reasoning_toggle():
    assert text(conversation(think=True)) == (
        f"<SPECIAL_10>System\n{SYSTEM}\n"
        "<SPECIAL_11>User\nWhat does `json.dumps` do?\n"
        "<SPECIAL_11>Assistant\n<think>\nIt lives in the json module.</think>"
        "Serialize obj to a JSON formatted str.\n<SPECIAL_12>\n")
    assert text(conversation(think=False)) == (
        f"<SPECIAL_10>System\n{SYSTEM}\n"
        "<SPECIAL_11>User\nWhat does `json.dumps` do?\n"
        "<SPECIAL_11>Assistant\n<think></think>Serialize obj to a JSON formatted str."
        "\n<SPECIAL_12>\n")


TOOL_TURNS = [
    {"role": "user", "content": "Convert 20 and tell me the time."},
    {"role": "assistant", "content": "I will call both.", "tool_calls": [
        {"type": "function", "function": {"name": "convert", "arguments": {"value": 20}}},
        {"name": "now", "arguments": "{}"}]},
    {"role": "tool", "content": "{\"value\": 68}"},
    {"role": "tool", "content": "\"12:00\""},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": {}}}]},
    {"role": "tool", "content": "\"12:01\""},
]

# (messages, tools, add_generation_prompt): each rendered by transformers and by us.
CASES = {
    "system /think": ([*conversation(True).prompt,
                       {"role": "assistant", "content": conversation(True).reply}], None, False),
    "system /no_think": ([*conversation(False).prompt,
                          {"role": "assistant", "content": conversation(False).reply}],
                         None, False),
    "no system message": ([{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Greet.</think>Hello."}], None, False),
    "earlier reasoning stripped, /no_think in a user turn": (
        [{"role": "system", "content": "/think Be brief."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Greet them.</think>\nHello."},
         {"role": "user", "content": "Bye /no_think"},
         {"role": "assistant", "content": "Goodbye."}], None, False),
    "tools, tool calls and tool responses": (
        [{"role": "system", "content": SYSTEM}, *TOOL_TURNS,
         {"role": "assistant", "content": "Both done.</think>68 °F, 12:01."}], TOOLS, False),
    "tools without a system message": (
        [{"role": "user", "content": "Time? /no_think"}], TOOLS, True),
    "generation prompt, /think": (list(conversation(True).prompt), None, True),
    "generation prompt, /no_think": (list(conversation(False).prompt), None, True),
    "generation prompt after tool responses": (TOOL_TURNS, TOOLS, True),
}


@pytest.mark.parametrize("name", CASES)
def test_rendering_is_transformers_apply_chat_template(name, hf_tokenizer):
    messages, tools, add_generation_prompt = CASES[name]
    expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    assert chat.render(messages, tools=tools,
                       add_generation_prompt=add_generation_prompt) == expected


def test_what_the_template_shows_of_toggles_history_and_tools():
    messages, tools, _ = CASES["earlier reasoning stripped, /no_think in a user turn"]
    assert chat.render(messages, tools=tools) == (
        "<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\nHi\n"
        "<SPECIAL_11>Assistant\nHello.\n<SPECIAL_12>\n<SPECIAL_11>User\nBye\n"
        "<SPECIAL_11>Assistant\n<think></think>Goodbye.\n<SPECIAL_12>\n")
    rendered = chat.render(TOOL_TURNS, tools=TOOLS, add_generation_prompt=True)
    assert '<AVAILABLE_TOOLS>[{"name": "convert", "description": "Degrees <°C> to °F & back"' \
        in rendered
    assert ('<SPECIAL_11>Assistant\nI will call both.\n\n<TOOLCALL>[{"name": "convert", '
            '"arguments": {"value": 20}}, {"name": "now", "arguments": {}}]</TOOLCALL>\n'
            '<SPECIAL_12>\n<SPECIAL_11>User\n<TOOL_RESPONSE>[{"value": 68}, "12:00"]'
            '</TOOL_RESPONSE>\n') in rendered
    assert rendered.endswith('<TOOL_RESPONSE>["12:01"]</TOOL_RESPONSE>\n'
                             '<SPECIAL_11>Assistant\n<think>\n')


def test_the_generation_prompt_opens_the_think_block_as_the_toggle_asks():
    on = [{"role": "user", "content": "Hi"}]
    off = [{"role": "user", "content": "Hi /no_think"}]
    assert chat.render(on, add_generation_prompt=True) == (
        "<SPECIAL_10>System\n\n<SPECIAL_11>User\nHi\n<SPECIAL_11>Assistant\n<think>\n")
    assert chat.render(off, add_generation_prompt=True) == (
        "<SPECIAL_10>System\n\n<SPECIAL_11>User\nHi\n<SPECIAL_11>Assistant\n<think></think>")
    assert chat.thinking(on) and not chat.thinking(off)  # reasoning is on by default


def test_with_reasoning_puts_the_toggle_in_the_system_message():
    asked = [{"role": "system", "content": "Be brief. /no_think"},
             {"role": "user", "content": "Why? /no_think"}]
    on = chat.with_reasoning(asked, True)
    assert on == [{"role": "system", "content": "Be brief. /think"},
                  {"role": "user", "content": "Why? "}]
    assert chat.render(on, add_generation_prompt=True).endswith("Assistant\n<think>\n")
    assert asked[0]["content"].endswith("/no_think")  # the caller's messages are left alone
    off = chat.with_reasoning(asked[1:], False)
    assert off[0] == {"role": "system", "content": "/no_think"} and len(off) == 2
    assert chat.render(off, add_generation_prompt=True) == (
        "<SPECIAL_10>System\n\n<SPECIAL_11>User\nWhy?\n<SPECIAL_11>Assistant\n<think></think>")


def test_messages_the_template_cannot_render_are_refused_in_one_line():
    nameless_call = {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}
    for messages, tools, message in [
            ([], None, "no messages to render"),
            ([{"role": "user", "content": None}], None, r"\"content\": text \(\"\" for none\)"),
            ([{"role": "user", "content": "Hi"}], "now", "tools must be a list of JSON schemas"),
            ([{"role": "user", "content": "Hi"}, nameless_call, {"role": "user", "content": "?"}],
             TOOLS, "give each tool call a \"name\" and \"arguments\"")]:
        with pytest.raises(DataError, match=message) as error:
            chat.render(messages, tools=tools)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("reply, think, parts", [
    ("Add.</think>9\n<SPECIAL_12>\n", True, ("Add.", "9")),
    ("9\n<SPECIAL_12>", False, ("", "9")),
    (" 9 ", False, ("", "9")),
    ("9\n<SPECIAL_12>\n</think>", False, ("", "9")),  # what follows the turn is not the reply
])
def test_replies_split_into_reasoning_and_answer(reply, think, parts):
    assert chat.split_response(reply, think) == parts


@pytest.mark.parametrize("reply, think", [
    ("9", True),  # reasoning never closed
    ("Add.</think>9", False),  # reasoning under /no_think
    ("<think>Add.</think>9", True),  # the template writes <think> itself
    ("Add.</think>9</think>", True),
])
def test_replies_of_another_form_are_refused(reply, think):
    with pytest.raises(DataError, match=f"a /{'' if think else 'no_'}think reply must be"):
        chat.split_response(reply, think)


def test_loss_mask_covers_exactly_the_last_assistant_turn(tokenizer):
    turns = (chat.system_message(True, SYSTEM), {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Greet.</think>Hello."},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."})
    sequences = chat.pack_conversations([chat.Conversation(turns, "They leave.")], tokenizer,
                                        seq_length=96)
    sample = sequences.sample(0)
    trained = sample["loss_mask"].bool()
    assert tokenizer.decode(sample["labels"][trained].tolist()) == (
        "<think>\nThey leave.</think>Goodbye.\n<SPECIAL_12>")
    # Everything else -- system and user turns, the earlier assistant turn, the assistant
    # header, the newline after the turn, EOD, padding -- is not.
    rest = sample["labels"][~trained].tolist()
    assert tokenizer.decode([t for t in rest if t not in (tokenizer.eod, tokenizer.pad)]) == (
        f"System\n{SYSTEM}\n<SPECIAL_11>User\nHi\n<SPECIAL_11>Assistant\nHello.\n"
        "<SPECIAL_12>\n<SPECIAL_11>User\nBye\n<SPECIAL_11>Assistant\n\n")
    assert rest.count(tokenizer.eod) == 1
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
    # Training tokenises the prompt exactly as generation does.
    prompt = chat.prompt_ids(turns[:-1], tokenizer)
    assert sequences.ids[0, :len(prompt)].tolist() == prompt
    assert tokenizer.decode(prompt).endswith("<SPECIAL_11>Assistant\n<think>\n")


def test_special_markers_are_single_tokens(tokenizer, hf_tokenizer):
    ids = chat.special_ids(tokenizer)
    assert list(ids) == list(chat.SPECIAL_TOKENS) == list(SPECIAL_TOKENS[2:])
    assert list(ids.values()) == [2, 3, 4, 5, 6] and (tokenizer.eod, tokenizer.pad) == (0, 1)
    rendered = text(conversation(True))
    encoded = tokenizer.encode(rendered)
    for marker, marker_id in ids.items():
        assert encoded.count(marker_id) == rendered.count(marker) > 0
    assert hf_tokenizer.encode(rendered, add_special_tokens=False) == encoded
    assert chat.END_OF_TURN == "<SPECIAL_12>" and ids[chat.END_OF_TURN] == 4


def test_packing_keeps_conversations_whole_and_in_order(tokenizer):
    conversations = [conversation(i % 2 == 0, question=f"What does `m.f{i}` do?",
                                  answer="x" * (i * 7 % 40 + 5) + ".") for i in range(30)]
    sequences = chat.pack_conversations(conversations, tokenizer, seq_length=256)
    unpacked = chat.pack_conversations(conversations, tokenizer, seq_length=256, packed=False)
    assert len(unpacked) == 30 and 30 / len(sequences) >= 2  # several per sequence
    found = []
    for row in range(len(sequences)):
        ids, positions = sequences.ids[row], sequences.positions[row]
        ends = numpy.flatnonzero(ids == tokenizer.eod)
        starts = numpy.concatenate([[0], ends[:-1] + 1])
        for start, end in zip(starts, ends):
            found.append(tokenizer.decode(ids[start:end].tolist()))
            assert positions[start:end + 1].tolist() == list(range(end + 1 - start))
        assert (ids[ends[-1] + 1:] == tokenizer.pad).all()  # only padding after the last EOD
    assert found == [text(c) for c in conversations]
    # The loss mask of a packed sample is the conversations' own masks side by side.
    masks = [chat.pack_conversations([c], tokenizer, seq_length=256).trained[0] for c in
             conversations]
    assert sequences.trained.sum() == sum(mask.sum() for mask in masks)


def test_a_conversation_longer_than_the_sequence_is_refused(tokenizer):
    with pytest.raises(DataError, match=r"conversation 2 has \d+ tokens, more than the sequence "
                                        r"length \(80\): raise train.seq_length"):
        chat.pack_conversations([conversation(False, answer="Ok."), conversation(True)],
                                tokenizer, seq_length=80)


def test_jsonl_round_trip_and_one_line_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [{"messages": list(c.messages), "reasoning": c.reasoning}
               for c in (conversation(True), conversation(False))]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert chat.read_conversations(path) == [conversation(True), conversation(False)]
    think, no_think = records[0]["messages"], records[1]["messages"]
    bad = [({"messages": think}, r"/think conversation .* needs its \"reasoning\""),
           ({"messages": think[1:]}, r"/think conversation"),  # reasoning is on by default
           ({"messages": no_think, "reasoning": "x"}, r"/no_think conversation has "
                                                      r"\"reasoning\""),
           ({"messages": [*no_think[:2], {"role": "assistant", "content": "<think>x</think>Ok."}]},
            r"its content is the answer alone"),
           ({"messages": [*no_think[:2], {"role": "assistant", "content": " "}]},
            r"content \(its answer\) is empty"),
           ({"messages": no_think[:2]}, r"the last message's role must be assistant"),
           ({"messages": no_think[::-1]}, r"message 3 is a system message: move it first"),
           ({"reasoning": ""}, r"missing key 'messages'"),
           ({"messages": [{"role": "bot", "content": "x"}]}, r"\"role\": one of system, user")]
    for record, message in bad:
        path.write_text(json.dumps(records[1]) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=f"chat.jsonl:2: .*{message}") as error:
            chat.read_conversations(path)
        assert "\n" not in str(error.value)


def test_chosen_responses_must_obey_the_toggle_rejected_ones_need_not(tmp_path):
    path = tmp_path / "pairs.jsonl"
    prompt = list(conversation(False).prompt)
    good = {"prompt": prompt, "chosen": "Yes.", "rejected": "Hm.</think>No."}
    path.write_text(json.dumps(good) + "\n")
    assert chat.read_pairs(path)[0].rejected == "Hm.</think>No."
    path.write_text(json.dumps({**good, "chosen": "hmm</think>Yes."}) + "\n")
    with pytest.raises(DataError, match="pairs.jsonl:1: \"chosen\": a /no_think reply must be "
                                        "the answer alone"):
        chat.read_pairs(path)
    think_prompt = list(conversation(True).prompt)
    path.write_text(json.dumps({**good, "prompt": think_prompt, "chosen": "</think>Yes."}) + "\n")
    with pytest.raises(DataError, match="\"chosen\" must have reasoning and an answer for a "
                                        "/think prompt"):
        chat.read_pairs(path)


def test_datasets_cycle_epochs_and_keep_pairs_together(tokenizer):
    conversations = [conversation(i % 2 == 0, question=f"Q{i}?") for i in range(6)]
    sequences = chat.pack_conversations(conversations, tokenizer, seq_length=128, packed=False)
    dataset = chat.ChatDataset(sequences, num_samples=15, seed=3)
    first, second = ([dataset.order(i) for i in range(e * 6, e * 6 + 6)] for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    assert len(dataset) == 15 and dataset[14]["tokens"].shape == (128,)
    pairs = [chat.PreferencePair(c.prompt, chat.response("Right.", c.reasoning),
                                 chat.response("Wrong.", c.reasoning)) for c in conversations]
    pair_seqs = chat.pair_sequences(pairs, tokenizer, seq_length=128)
    preference = chat.PreferenceDataset(pair_seqs, torch.arange(12.0), num_samples=24, seed=3)
    for sample in range(0, 24, 2):
        chosen, rejected = preference[sample], preference[sample + 1]
        assert chosen["tokens"][:40].tolist() == rejected["tokens"][:40].tolist()
        assert rejected["ref_logp"] == chosen["ref_logp"] + 1  # rows 2k, 2k+1
        assert tokenizer.decode(chosen["labels"][chosen["loss_mask"].bool()].tolist()) \
            .endswith("Right.\n<SPECIAL_12>")


def test_a_tokenizer_without_the_chat_markers_is_refused(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["plain text, no chat tokens"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<think>", "</think>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "tokenizer.json")))
    with pytest.raises(DataError, match=re.escape(
            "the tokenizer has no special token <SPECIAL_10>, <SPECIAL_11>, <SPECIAL_12>: the "
            "chat template needs")) as error:
        chat.pack_conversations([conversation(True)], plain, seq_length=256)
    assert "Nemotron Nano 2's tokenizer.json" in str(error.value)
