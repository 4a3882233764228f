"""Data: embedded corpus, tokenizers, preprocessing, Megatron-Core datasets, micro-batches."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.data import DataError, corpus
from megatron_hybrid.data.datasets import DataConfig, build_datasets, microbatch_iterator
from megatron_hybrid.data.preprocess import preprocess_jsonl
from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer, train_bpe
from megatron_hybrid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1024

backends.install("cpu")  # before Megatron-Core (the dataset modules) is imported


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def corpus_info(cache_dir):
    return corpus.build_default_corpus(corpus.default_corpus_dir(cache_dir))


@pytest.fixture(scope="session")
def tokenizer(cache_dir, corpus_info):
    return load_tokenizer(TokenizerConfig(vocab_size=VOCAB), cache_dir)


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory, corpus_info):
    """200 real documents plus one with non-ASCII text."""
    lines = corpus_info.train_path.read_text().splitlines()[:200]
    lines.append(json.dumps({"text": "naïve — 你好, \t tabs\n\nand <think>tags</think>"}))
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def two_prefixes(tmp_path_factory, corpus_info, tokenizer):
    """Two small indexed datasets from disjoint halves of the corpus."""
    out = tmp_path_factory.mktemp("indexed")
    lines = corpus_info.train_path.read_text().splitlines()
    prefixes = []
    for name, part in (("a", lines[:150]), ("b", lines[150:300])):
        (out / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        preprocess_jsonl(out / f"{name}.jsonl", out / name, tokenizer, append_eod=True,
                         progress=False)
        prefixes.append(str(out / name))
    return prefixes


def read_indexed(prefix):
    from megatron_hybrid.mcore import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def assert_one_line_naming(err, path):
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


# --- corpus -------------------------------------------------------------------------------

# The shipped corpus's identity: a change to the data file or to its split shows up here first
# (tokenizer and token caches are keyed on it, and every tiny training outcome depends on it).
CORPUS_SHA256 = "c524aed1182a98c02164555eb3ab0269285554df8fa1a0c28cf4973c203b7fe6"


def test_corpus_is_the_shipped_text_of_a_few_megabytes(corpus_info, tmp_path):
    assert corpus_info.sha256 == CORPUS_SHA256
    assert (corpus_info.num_docs, corpus_info.num_valid_docs) == (402, 15)
    assert 1_000_000 < corpus_info.num_bytes < 10_000_000
    assert corpus.SOURCE_PATH.stat().st_size < 1_000_000
    again = corpus.build_default_corpus(tmp_path)
    assert again.sha256 == corpus_info.sha256
    assert again.train_path.read_bytes() == corpus_info.train_path.read_bytes()
    train, valid = (corpus.read_texts(path) for path in (again.train_path, again.valid_path))
    assert not set(train) & set(valid)
    assert any(text.startswith("module json\n") for text in train + valid)


def test_corpus_is_cached(corpus_info):
    start = time.perf_counter()
    assert corpus.build_default_corpus(corpus_info.train_path.parent) == corpus_info
    assert time.perf_counter() - start < 0.1


# --- tokenizers ---------------------------------------------------------------------------

def test_default_bpe_round_trips_with_reserved_special_tokens(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.eod, tokenizer.pad) == (0, 1)
    assert [tokenizer.backend.token_to_id(t) for t in
            ("<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<think>", "</think>")] == [
                2, 3, 4, 5, 6]
    for text in ("def f(x):\n    return x  # ok", "naïve — 你好 🙂", " tabs\t\n\n", ""):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < VOCAB for i in ids)
    assert tokenizer.identity["kind"] == "default-bpe"
    assert tokenizer.identity["sha256"] and tokenizer.unique_identifiers == tokenizer.identity


def test_bpe_training_is_deterministic_and_its_cache_reused(cache_dir, corpus_info, tokenizer,
                                                            tmp_path):
    start = time.perf_counter()
    train_bpe(corpus_info.train_path, VOCAB, tmp_path / "again.json")
    train_seconds = time.perf_counter() - start
    assert (tmp_path / "again.json").read_bytes() == tokenizer.json_path.read_bytes()
    start = time.perf_counter()
    reloaded = load_tokenizer(TokenizerConfig(vocab_size=VOCAB), cache_dir)
    assert time.perf_counter() - start < train_seconds / 5
    assert reloaded.identity == tokenizer.identity and reloaded.json_path == tokenizer.json_path


def test_hf_tokenizer_json_loads_with_its_identity(tokenizer, tmp_path):
    hf = load_tokenizer(TokenizerConfig(kind="hf", path=str(tokenizer.json_path)))
    assert hf.identity == {**tokenizer.identity, "kind": "hf"}
    assert hf.encode("Return the value.") == tokenizer.encode("Return the value.")
    with pytest.raises(DataError) as err:
        load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "nope.json")))
    assert_one_line_naming(err, tmp_path / "nope.json")
    with pytest.raises(DataError, match="set tokenizer.pad_token"):
        load_tokenizer(TokenizerConfig(kind="hf", path=str(tokenizer.json_path),
                                       pad_token="<nope>"))
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_tokenizer(TokenizerConfig(kind="hf"))


# --- preprocessing ------------------------------------------------------------------------

def test_preprocess_writes_the_exact_token_ids(docs_jsonl, tokenizer, tmp_path):
    stats = preprocess_jsonl(docs_jsonl, tmp_path / "out" / "docs", tokenizer, append_eod=True,
                             progress=False)
    texts = corpus.read_texts(docs_jsonl)
    expected = [tokenizer.encode(text) + [tokenizer.eod] for text in texts]
    sequences, dtype = read_indexed(tmp_path / "out" / "docs")
    assert sequences == expected and dtype == numpy.uint16
    assert (stats.num_docs, stats.num_tokens) == (len(texts), sum(map(len, expected)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.bin", "docs.idx"]


def test_preprocess_with_workers_matches_one_process(docs_jsonl, tokenizer, tmp_path):
    for workers in (1, 2):
        preprocess_jsonl(docs_jsonl, tmp_path / f"w{workers}", tokenizer, workers=workers,
                         chunk_docs=16, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


BAD_INPUTS = {
    "missing": (None, "not found"),
    "empty": ("", "empty"),
    "blank": ("\n  \n", "no documents"),
    "bad_json": ('{"text": "a"}\n{"text": "b"}\n{"text": \n', ":3: bad JSON"),
    "missing_key": ('{"text": "a"}\n{"body": "b"}\n', ":2: no key 'text' (found: body)"),
    "not_a_string": ('{"text": 7}\n', ":1: 'text' must be a string, not int"),
}


@pytest.mark.parametrize("case, workers", [(case, 1) for case in BAD_INPUTS]
                         + [("bad_json", 2), ("missing_key", 2)])  # raised inside a worker
def test_bad_input_is_one_line_and_writes_nothing(case, workers, tokenizer, tmp_path):
    content, expected = BAD_INPUTS[case]
    input_path = tmp_path / f"{case}.jsonl"
    if content is not None:
        input_path.write_text(content)
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        preprocess_jsonl(input_path, tmp_path / "out" / "x", tokenizer, workers=workers,
                         chunk_docs=1, progress=False)
    assert_one_line_naming(err, input_path)
    assert not list(tmp_path.glob("out/*"))


def test_cli_is_thin_and_reports_errors_in_one_line(docs_jsonl, tokenizer, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("preprocess_data",
                                                  ROOT / "tools" / "preprocess_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    common = ["--tokenizer-kind", "hf", "--tokenizer-path", str(tokenizer.json_path)]
    assert cli.main(["--input", str(docs_jsonl), "--output-prefix", str(tmp_path / "cli"),
                     "--workers", "1", *common]) == 0
    assert "documents" in capsys.readouterr().out
    sequences, _ = read_indexed(tmp_path / "cli")
    assert sequences[0] == tokenizer.encode(corpus.read_texts(docs_jsonl)[0])
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["--input", str(missing), "--output-prefix", str(tmp_path / "x"),
                     *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err
    help_run = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
                               "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--output-prefix" in help_run.stdout


# --- datasets -----------------------------------------------------------------------------

def test_weighted_and_plain_blends_build(two_prefixes, tokenizer, cache_dir):
    weighted = DataConfig(blend=[[0.3, two_prefixes[0]], [0.7, two_prefixes[1]]], split="90,10,0")
    train, valid = build_datasets(weighted, tokenizer, seq_length=64, train_samples=400,
                                  valid_samples=20, cache_dir=cache_dir)
    assert len(train) >= 400 and len(valid) >= 20
    share_b = numpy.mean([train[i]["dataset_id"] for i in range(400)])
    assert abs(share_b - 0.7) < 0.05
    assert not torch.distributed.is_initialized()  # the builder's private group is gone
    plain = DataConfig(blend=two_prefixes, split="90,10,0")
    train, _ = build_datasets(plain, tokenizer, seq_length=64, train_samples=100,
                              valid_samples=10, cache_dir=cache_dir)
    assert train[0]["tokens"].shape == (64,)


def test_default_corpus_and_mock_datasets_build(tokenizer, cache_dir):
    train, valid = build_datasets(DataConfig(default_corpus=True), tokenizer, seq_length=128,
                                  train_samples=50, valid_samples=5, cache_dir=cache_dir)
    sample = train[0]
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert len(valid) >= 5 and int(sample["tokens"].max()) < VOCAB
    train, valid = build_datasets(DataConfig(mock=True), tokenizer, seq_length=32,
                                  train_samples=20, valid_samples=4, cache_dir=cache_dir)
    assert train[0]["tokens"].shape == (32,) and len(valid) >= 4


@pytest.fixture(scope="module")
def train_dataset(two_prefixes, tokenizer, cache_dir):
    cfg = DataConfig(blend=two_prefixes, split="90,10,0")
    return build_datasets(cfg, tokenizer, seq_length=32, train_samples=200, valid_samples=10,
                          cache_dir=cache_dir)[0]


def global_batches(dataset, *, dp_size, micro_batch_size, steps, start_sample=0, num_workers=0):
    """Each step's global batch: the ranks' micro-batches concatenated in rank order."""
    num_microbatches = 8 // (micro_batch_size * dp_size)
    per_rank = [list(microbatch_iterator(dataset, start_sample=start_sample,
                                         micro_batch_size=micro_batch_size,
                                         num_microbatches=num_microbatches, dp_rank=rank,
                                         dp_size=dp_size, num_workers=num_workers))
                for rank in range(dp_size)]
    batches = []
    for step in range(steps):
        micro = slice(step * num_microbatches, (step + 1) * num_microbatches)
        parts = [mb for rank_batches in per_rank for mb in rank_batches[micro]]
        batches.append({key: torch.cat([mb[key] for mb in parts]) for key in parts[0]})
    return batches


def test_global_batch_does_not_depend_on_dp_size(train_dataset):
    one = global_batches(train_dataset, dp_size=1, micro_batch_size=2, steps=3)
    two = global_batches(train_dataset, dp_size=2, micro_batch_size=1, steps=3)
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = one[0]
    assert first["tokens"].dtype == torch.long and first["loss_mask"].dtype == torch.float32
    assert torch.equal(first["tokens"], torch.stack([train_dataset[i]["tokens"]
                                                     for i in range(8)]))


def test_resume_from_a_sample_offset_continues_exactly(train_dataset):
    straight = global_batches(train_dataset, dp_size=2, micro_batch_size=2, steps=3)
    resumed = global_batches(train_dataset, dp_size=2, micro_batch_size=2, steps=2,
                             start_sample=8, num_workers=1)
    for a, b in zip(straight[1:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_iterator_stops_before_an_incomplete_step(train_dataset):
    start = len(train_dataset) - 12  # one full step of 8 and 4 samples left over
    batches = list(microbatch_iterator(train_dataset, start_sample=start, micro_batch_size=2,
                                       num_microbatches=4, dp_rank=0, dp_size=1))
    assert len(batches) == 4


def damage(prefix, tmp_path, how):
    """A copy of ``prefix`` damaged in one way; returns (new prefix, the file to be named)."""
    new = tmp_path / "damaged"
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, str(new) + suffix)
    idx, bin_ = Path(f"{new}.idx"), Path(f"{new}.bin")
    if how == "missing_bin":
        bin_.unlink()
        return new, bin_
    if how == "missing_idx":
        idx.unlink()
        return new, idx
    if how == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-9])
        return new, idx
    if how == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
        return new, bin_
    if how == "not_an_index":
        idx.write_bytes(b"garbage")
        return new, idx
    from megatron_hybrid.mcore import IndexedDatasetBuilder

    IndexedDatasetBuilder(str(bin_), dtype=numpy.uint16).finalize(str(idx))  # "empty"
    return new, new


@pytest.mark.parametrize("how", ["missing_bin", "missing_idx", "truncated_idx", "truncated_bin",
                                 "not_an_index", "empty"])
def test_damaged_data_files_fail_in_one_line_before_megatron(how, two_prefixes, tokenizer,
                                                             cache_dir, tmp_path):
    prefix, named = damage(two_prefixes[0], tmp_path, how)
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(blend=[str(prefix)]), tokenizer, seq_length=32,
                       train_samples=10, valid_samples=2, cache_dir=cache_dir)
    assert_one_line_naming(err, named)


def test_a_split_left_without_documents_is_an_error_not_a_hang(tokenizer, cache_dir, tmp_path):
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n"
                                                for i in range(5)))
    preprocess_jsonl(tmp_path / "few.jsonl", tmp_path / "few", tokenizer, progress=False)
    with pytest.raises(DataError, match="leaves the valid split of its 5 documents empty"):
        build_datasets(DataConfig(blend=[str(tmp_path / "few")], split="98,2,0"), tokenizer,
                       seq_length=4, train_samples=4, valid_samples=0, cache_dir=cache_dir)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "got: none"),
    ({"mock": True, "default_corpus": True}, "got: mock, default_corpus"),
    ({"blend": ["a", [0.5, "b"]]}, "not a mix"),
    ({"blend": [[0, "a"]]}, "positive weights"),
    ({"blend": ["a"], "split": "9x,1"}, "data.split"),
])
def test_data_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs).validate()
