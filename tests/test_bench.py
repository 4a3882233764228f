"""The benchmark's machinery on a small model: both sides really train the same model.

Speed itself is not asserted here (it depends on the machine and its load); the benchmark's
report, docs/performance.md, records it. What can fail here: the two sides computing
different models, the report's arithmetic, the command line.
"""

import json
import subprocess
import sys

import pytest

from megatron_hybrid import bench

SMALL = ["--pattern", "M*-", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "16",
         "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
         "--mamba-num-groups", "2", "--vocab-size", "256", "--seq-length", "128",
         "--mamba-chunk-size", "32", "--batch-size", "1", "--warmup", "1", "--steps", "2",
         "--threads", "1"]


@pytest.fixture(scope="module")
def result():
    command = [sys.executable, "-m", "megatron_hybrid", "bench", *SMALL, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_both_sides_train_the_same_model(result):
    assert result["ours"]["parameters"] == result["hf"]["parameters"] == result["parameters"]
    losses = result["ours"]["losses"], result["hf"]["losses"]
    assert len(losses[0]) == len(losses[1]) == 3
    # Same weights, batches and AdamW: the loss curves agree step by step, and they move.
    assert result["loss_max_abs_diff"] < 1e-3
    assert losses[0][-1] != losses[0][0]


def test_report_arithmetic(result):
    ours, hf = result["ours"], result["hf"]
    assert result["tokens_per_step"] == 128
    for side in (ours, hf):
        assert len(side["step_seconds"]) == 2
        assert side["tokens_per_s"] == pytest.approx(128 / side["step_seconds_median"])
        assert side["flops_per_s"] == pytest.approx(result["flops_per_token"]
                                                    * side["tokens_per_s"])
        assert 0 < side["mfu"] < 1 and side["peak_rss_bytes"] > 0
    assert result["ratio"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    assert result["meets_targets"]["ratio"] == (result["ratio"] >= bench.TARGET_RATIO)


def test_text_report_names_the_targets(result):
    text = bench.format_report(result)
    assert f"ratio ours/HF: {result['ratio']:.2f}x" in text
    assert "target >= 1.5x" in text and "target >= 60%" in text


def test_bad_settings_are_one_line_errors():
    done = subprocess.run([sys.executable, "-m", "megatron_hybrid", "bench", "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--steps >= 1" in done.stderr
    assert "Traceback" not in done.stderr
