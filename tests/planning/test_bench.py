"""The benchmark's machinery on a small model: both sides really train the same model, with
the same settings, and MFU is taken against this run's own peak.

Speed itself is not asserted here (it depends on the machine and its load); the benchmark's
report, docs/performance.md, records it. What can fail here: the two sides computing
different models or running with different settings, the peak probes, the report's
arithmetic, the command line.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_hybrid.planning import bench

SMALL = ["--pattern", "M*-", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "16",
         "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
         "--mamba-num-groups", "2", "--vocab-size", "256", "--seq-length", "128",
         "--mamba-chunk-size", "32", "--batch-size", "1", "--warmup", "1", "--steps", "2",
         "--threads", "1"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def result():
    command = [sys.executable, "-m", "megatron_hybrid", "bench", *SMALL, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_both_sides_train_the_same_model(result):
    assert result["ours"]["parameters"] == result["hf"]["parameters"] == result["parameters"]
    losses = result["ours"]["losses"], result["hf"]["losses"]
    assert len(losses[0]) == len(losses[1]) == 3
    # Same weights, batches and AdamW: the loss curves agree step by step.
    assert result["loss_max_abs_diff"] == max(abs(a - b) for a, b in zip(*losses))
    assert result["loss_max_abs_diff"] < bench.LOSS_TOLERANCE == 4e-4
    assert result["losses_agree"]


def test_both_sides_run_with_the_same_settings(result):
    ours, hf = result["ours"]["settings"], result["hf"]["settings"]
    assert set(ours) == set(hf) == {*bench.EQUAL_SETTINGS, "kernels"}
    for key in bench.EQUAL_SETTINGS:
        assert ours[key] == hf[key], key
    assert result["settings_unequal"] == []
    assert ours["threads"] == 1 and ours["optimizer"] == "torch.optim.AdamW(fused=True)"
    # The code paths are what differs: our kernels in Megatron-Core's mixer, HF's own.
    assert "megatron_hybrid.backends.kernels" in ours["kernels"]
    assert hf["kernels"].startswith("transformers.") and hf["kernels"].endswith("torch path")


def test_settings_are_read_from_the_process_not_assumed():
    # Control: a fresh process has neither setting; the backend's functions turn both on.
    code = ("import json, torch; from megatron_hybrid.planning import bench; torch.set_num_threads(2); "
            "read = lambda: [bench.denormals_flushed(), bench.large_allocations_stay_in_heap()]; "
            "before = read(); bench.apply_process_settings(()); "
            "print(json.dumps([before, read()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True)
    assert json.loads(done.stdout) == [[False, False], [True, True]]


def test_adamw_implementation_is_read_from_the_param_groups():
    import torch

    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW([{"params": weights[:1]}, {"params": weights[1:]}])
    assert bench.adamw_implementation([optimizer]) == "torch.optim.AdamW(for-loop)"
    optimizer.param_groups[1]["fused"] = True
    assert bench.adamw_implementation([optimizer]) == (
        "torch.optim.AdamW(for-loop) + torch.optim.AdamW(fused=True)")


def test_mfu_is_against_the_best_peak_probe_of_this_run(result):
    probes = result["peak_probes"]
    assert [probe["after_step"] for probe in probes] == [None, 0, 1, 2]
    times = [probe["time"] for probe in probes]
    assert times == sorted(times) and times[-1] - times[0] < 600
    assert result["peak_probe"] == max(probes, key=lambda probe: probe["flops"])
    assert result["peak_flops"] == result["peak_probe"]["flops"] > 0
    for side in (result["ours"], result["hf"]):
        assert side["mfu"] == pytest.approx(side["flops_per_s"] / result["peak_flops"])


def test_report_arithmetic(result):
    ours, hf = result["ours"], result["hf"]
    assert result["tokens_per_step"] == 128
    for side in (ours, hf):
        assert len(side["step_seconds"]) == 2
        assert side["tokens_per_s"] == pytest.approx(128 / side["step_seconds_median"])
        assert side["flops_per_s"] == pytest.approx(result["flops_per_token"]
                                                    * side["tokens_per_s"])
        assert side["peak_rss_bytes"] > 0
    assert result["ratio"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    assert result["meets_targets"]["ratio"] == (result["ratio"] >= bench.TARGET_RATIO)


def test_text_report_names_the_peer_the_settings_and_the_targets(result):
    text = bench.format_report(result)
    assert "HF NemotronH torch reference path" in text
    assert "settings: equal on both sides" in text
    assert f"ratio ours/HF: {result['ratio']:.2f}x" in text
    assert "target >= 1.5x" in text and "target >= 60%" in text
    assert "best of 4 probes" in text and "tolerance 4e-04: met" in text


def test_bad_settings_are_one_line_errors():
    done = subprocess.run([sys.executable, "-m", "megatron_hybrid", "bench", "--steps", "0"],
                          capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert done.returncode != 0 and "--steps >= 1" in done.stderr
    assert "Traceback" not in done.stderr
