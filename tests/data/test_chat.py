"""Chat data: the template with the reasoning toggle, the assistant-only loss mask, packing,
and JSONL input (the offline default sets are tests/test_task.py's)."""

import json
import re

import numpy
import pytest

from megatron_hybrid.data import DataError, chat
from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer

SYSTEM = "You are a concise assistant for the Python standard library."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerConfig())


def conversation(think: bool, question: str = "What does `json.dumps` do?",
                 answer: str = "Serialize obj to a JSON formatted str.") -> chat.Conversation:
    return chat.Conversation(
        (chat.system_message(think, SYSTEM), {"role": "user", "content": question},
         {"role": "assistant", "content": answer}),
        "It lives in the json module." if think else "")


def test_template_text_with_the_reasoning_toggle():
    assert chat.render(conversation(think=True)) == (
        f"<|im_start|>system\n{SYSTEM} /think<|im_end|>\n"
        "<|im_start|>user\nWhat does `json.dumps` do?<|im_end|>\n"
        "<|im_start|>assistant\n<think>It lives in the json module.</think>"
        "Serialize obj to a JSON formatted str.<|im_end|>")
    assert chat.render(conversation(think=False)) == (
        f"<|im_start|>system\n{SYSTEM} /no_think<|im_end|>\n"
        "<|im_start|>user\nWhat does `json.dumps` do?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>Serialize obj to a JSON formatted str.<|im_end|>")


def test_multi_turn_keeps_only_the_last_turns_reasoning():
    turns = (chat.system_message(True, SYSTEM), {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Goodbye."})
    text = chat.render(chat.Conversation(turns, "They leave."))
    assert text.endswith("<|im_start|>assistant\n<think></think>Hello.<|im_end|>\n"
                         "<|im_start|>user\nBye<|im_end|>\n"
                         "<|im_start|>assistant\n<think>They leave.</think>Goodbye.<|im_end|>")


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    turns = (chat.system_message(True, SYSTEM), {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Goodbye."})
    sequences = chat.pack_conversations([chat.Conversation(turns, "They leave.")], tokenizer,
                                        seq_length=96)
    sample = sequences.sample(0)
    trained = sample["loss_mask"].bool()
    assert tokenizer.decode(sample["labels"][trained].tolist()) == (
        "<think></think>Hello.<|im_end|><think>They leave.</think>Goodbye.<|im_end|>")
    # Everything else -- system, user turns, the assistant headers, EOD, padding -- is not.
    rest = sample["labels"][~trained].tolist()
    assert tokenizer.decode([t for t in rest if t not in (tokenizer.eod, tokenizer.pad)]) == (
        f"system\n{SYSTEM} /think<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert rest.count(tokenizer.eod) == 1
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()


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
    assert found == [chat.render(c) for c in conversations]
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
    bad = [({"messages": records[0]["messages"]}, r"/think conversation needs its \"reasoning\""),
           ({"messages": records[0]["messages"][1:]}, r"system prompt ending in /think or "),
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
    good = {"prompt": prompt, "chosen": "<think></think>Yes.", "rejected": "<think>Hm.</think>No."}
    path.write_text(json.dumps(good) + "\n")
    assert chat.read_pairs(path)[0].rejected == "<think>Hm.</think>No."
    path.write_text(json.dumps({**good, "chosen": "<think>hmm</think>Yes."}) + "\n")
    with pytest.raises(DataError, match="pairs.jsonl:1: \"chosen\" must open with an empty "
                                        "think block for a /no_think prompt"):
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
    import torch

    preference = chat.PreferenceDataset(pair_seqs, torch.arange(12.0), num_samples=24, seed=3)
    for sample in range(0, 24, 2):
        chosen, rejected = preference[sample], preference[sample + 1]
        assert chosen["tokens"][:40].tolist() == rejected["tokens"][:40].tolist()
        assert rejected["ref_logp"] == chosen["ref_logp"] + 1  # rows 2k, 2k+1
        assert "Right." in tokenizer.decode(chosen["labels"][chosen["loss_mask"].bool()].tolist())


def test_a_tokenizer_without_the_chat_tokens_is_refused(tmp_path, tokenizer):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["plain text, no chat tokens"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "tokenizer.json")))
    assert chat.special_ids(tokenizer)["<think>"] == 2
    with pytest.raises(DataError, match=re.escape(
            "the tokenizer has no special token <|im_start|>, <|im_end|>, <think>, </think>: "
            "chat data needs")):
        chat.pack_conversations([conversation(True)], plain, seq_length=256)
