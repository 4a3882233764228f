"""`bench decode` on a tiny model: the command's JSON, the cached tokens against the uncached
loop's on the benchmark's own model, the all-attention twin's parameter count, the command
line and its errors.

Speed is not asserted here (it depends on the machine and its load): docs/inference.md records
what was measured. What can fail here: the measurement or the report's arithmetic, the two
models or the two processes differing where they must not, the command line.
"""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from megatron_hybrid.cli import build_parser, main
from megatron_hybrid.cli.planning import run_bench, run_decode_bench
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.planning import decode_bench

TINY_MODEL = ["--pattern", "M*-M-", "--hidden-size", "64", "--ffn-hidden-size", "128",
              "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "16",
              "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
              "--mamba-num-groups", "2", "--vocab-size", "256", "--seq-length", "512",
              "--mamba-chunk-size", "32"]
TINY_RUN = ["--contexts", "16,64,300", "--batch", "2", "--new-tokens", "4", "--prompt", "32",
            "--repeats", "1", "--threads", "1"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The JSON of one tiny run, and the PNG it wrote."""
    plot = tmp_path_factory.mktemp("decode") / "curves.png"
    command = [sys.executable, "-m", "megatron_hybrid", "bench", "decode", *TINY_MODEL,
               *TINY_RUN, "--json", "--plot", str(plot)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), plot


def test_json_gives_per_token_latency_by_context(run):
    result, _ = run
    rows = result["contexts"]
    assert [row["context"] for row in rows] == [16, 64, 300]
    for row in rows:
        for model in decode_bench.MODELS:
            steps = row["step_ms"][model]
            assert len(steps) == 4 and min(steps) > 0
            assert row[f"{model}_ms"] == pytest.approx(statistics.median(steps))
            assert row["decode_rows"][model] >= 2  # the batch, as the engine pads it
    slopes = result["slopes_ms_per_1k"]
    assert set(slopes) == {"hybrid", "attention"}
    for model in decode_bench.MODELS:
        assert slopes[model] == pytest.approx(decode_bench.least_squares_slope(
            [row["context"] / 1000 for row in rows], [row[f"{model}_ms"] for row in rows]))


def test_json_gives_the_generation_ratios_and_targets(run):
    result, _ = run
    generation = result["generation"]
    for path in decode_bench.PATHS:
        assert len(generation[path]["seconds"]) == 1 and generation[path]["seconds_median"] > 0
    assert result["cached_speedup"] == pytest.approx(
        generation["uncached"]["seconds_median"] / generation["cached"]["seconds_median"])
    assert result["hf_ratio"] == pytest.approx(
        generation["hf"]["seconds_median"] / generation["cached"]["seconds_median"])
    assert result["meets_targets"]["hf_ratio"] == (result["hf_ratio"] >= 1.5)
    # Not the target's prompt (512) and new tokens (32), and no 16k context: not judged.
    assert result["meets_targets"]["cached_speedup"] is None
    assert result["meets_targets"]["latency_fraction"] is None
    assert result["latency_fraction"] is None


def test_cached_tokens_equal_the_uncached_ones_on_the_benchmarks_model(run):
    result, _ = run
    assert result["cached_equals_uncached"]
    # HF runs the same converted model: the same parameters; its greedy tokens are compared
    # and reported (fp32 reductions in another order may flip a near tie, so not asserted).
    assert result["parameters"]["hf"] == result["parameters"]["hybrid"]
    assert 0 <= result["hf_sequences_equal"] <= result["hf_sequences"] == 2


def test_both_processes_run_with_the_same_settings(run):
    result, _ = run
    ours, hf = result["settings"]["ours"], result["settings"]["hf"]
    assert result["settings_unequal"] == []
    assert ours["threads"] == hf["threads"] == 1
    assert ours["flush_denormal"] is hf["flush_denormal"] is True
    assert "megatron_hybrid.backends.kernels" in ours["kernels"]
    assert hf["kernels"].startswith("transformers.") and hf["kernels"].endswith("torch path")


def test_the_twin_is_all_attention_and_in_the_json(run):
    result, _ = run
    twin = result["models"]["attention"]
    assert twin["pattern"] == "*-*-*-"  # as many attention layers as the hybrid has mixers
    assert abs(result["twin_parameter_difference"]) <= decode_bench.TWIN_TOLERANCE


def test_text_report_and_plot(run):
    result, plot = run
    text = decode_bench.format_report(result)
    assert "all-attention twin *-*-*-" in text and "rows computed" in text
    assert "tokens: cached = uncached" in text
    assert "settings: equal in both processes" in text
    assert "not judged (measured at prompt 32, 4 new tokens)" in text
    assert "not measured (add 16384 to --contexts)" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", [decode_bench.DEFAULT_MODEL, ModelConfig(
    pattern="M-M-M-M*-M-M-", hidden_size=128, ffn_hidden_size=512, num_attention_heads=4,
    num_query_groups=2, kv_channels=32, mamba_num_heads=8, mamba_head_dim=32,
    mamba_state_dim=64, mamba_num_groups=2, vocab_size=4096)], ids=["default", "deeper"])
def test_the_attention_twin_has_the_hybrids_parameter_count(model):
    from megatron_hybrid.model.params import count_parameters

    twin = decode_bench.attention_twin(model)
    mixers = sum(symbol in "M*" for symbol in model.pattern)
    assert twin.pattern == "*-" * mixers
    assert twin.replace(pattern=model.pattern, ffn_hidden_size=model.ffn_hidden_size) == model
    hybrid, attention = count_parameters(model)["total"], count_parameters(twin)["total"]
    # The closest MLP width: within half a width step's parameters (one row and column of
    # each MLP), far inside the tolerance.
    assert abs(attention - hybrid) <= mixers * model.hidden_size
    assert abs(attention / hybrid - 1) <= decode_bench.TWIN_TOLERANCE


def test_engines_decoding_in_rounds_give_the_uncached_loops_tokens(tmp_path):
    """The latency measurement's engines (both models, several contexts, alive together and
    stepped in turn) decode what the uncached loop decodes alone."""
    from megatron_hybrid.inference.generate import generate_batch
    from megatron_hybrid.parallel import process_groups

    model = decode_bench.DEFAULT_MODEL.replace(**{
        "pattern": "M*-M-", "hidden_size": 64, "ffn_hidden_size": 128,
        "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
        "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_state_dim": 16,
        "mamba_num_groups": 2, "vocab_size": 256, "seq_length": 512, "mamba_chunk_size": 32})
    # In this process: at the session's own thread count, which the workers' setting would
    # otherwise change for the tests after this one.
    settings = decode_bench.DecodeSettings(model=model, contexts=(16, 300), new_tokens=4,
                                           threads=torch.get_num_threads())
    ours = decode_bench.OursDecoding(settings, tmp_path / "hf_weights.pt")
    try:
        for context in settings.contexts:
            ours.prefill(context)
        for index in range(settings.new_tokens):
            ours.decode_round(index)
        for name, engines in ours.engines.items():
            for context, engine in engines.items():
                cached = [list(engine.get_request(request).generated_tokens)
                          for request in range(settings.batch)]
                assert [len(tokens) for tokens in cached] == [1 + settings.new_tokens] * 2
                prompts = decode_bench.token_prompts(settings, context)
                assert cached == generate_batch(ours.models[name], prompts, 5), (name, context)
        rows = ours.finish_decode()
        assert all(rows[name][context] >= settings.batch for name in decode_bench.MODELS
                   for context in settings.contexts)
        assert ours.engines == {name: {} for name in decode_bench.MODELS}
    finally:
        process_groups.destroy_distributed()


def test_least_squares_slope_of_a_line():
    assert decode_bench.least_squares_slope([0.5, 1, 4], [3, 4, 10]) == pytest.approx(2)


def test_bench_keeps_training_and_decode_is_its_subcommand():
    parser = build_parser()
    training = parser.parse_args(["bench", "--steps", "3"])
    assert training.handler is run_bench and training.steps == 3
    decode = parser.parse_args(["bench", "decode", "--batch", "3", "--contexts", "128,2k"])
    assert decode.handler is run_decode_bench
    assert (decode.batch, decode.contexts) == (3, (128, 2048))


@pytest.mark.parametrize("arguments, message", [
    (["--contexts", "0,16"], "--contexts: a context of 0 tokens; give 1 or more"),
    (["--contexts", "16,600"], "--contexts: a context of 600 tokens + 4 new ones exceeds the "
                               "model's sequence length 512: give --seq-length 604 or a "
                               "shorter context"),
    (["--prompt", "510"], "give --seq-length 514 or a shorter prompt"),
    (["--batch", "0"], "--batch 0: give --batch 1 or more"),
    (["--new-tokens", "0"], "--new-tokens 0: give --new-tokens 1 or more"),
    (["--contexts", "64,64"], "--contexts needs at least two lengths for the slope"),
])
def test_bad_inputs_are_one_line_errors(capsys, arguments, message):
    assert main(["bench", "decode", *TINY_MODEL, *TINY_RUN, *arguments]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_a_context_that_is_no_number_names_the_form(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--contexts", "128,2x"])
    assert "'2x' is not a token count: give e.g. --contexts 128,512,2k,8k" in (
        capsys.readouterr().err)
