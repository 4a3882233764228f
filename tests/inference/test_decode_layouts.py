"""Cached decode on Megatron-Core's dynamic engine under tensor and pipeline parallelism: TP=2
and an uneven PP=2 (the pattern's stages of 7 and 5 layers, the second with two attention
layers) give the TP=1 greedy tokens and the same log probability at every generated position
(each from the step's full logits), on the same weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rank_environment

WORKER = Path(__file__).parents[1] / "workers" / "decode_parity.py"
LOG_PROB_TOLERANCE = 1e-5
"""fp32; measured 0.0 for both layouts (the same reductions in the same order on 2 cores)."""


def decode(tmp_path: Path, tp: int, pp: int) -> dict:
    out = tmp_path / f"tp{tp}pp{pp}.pt"
    nproc = tp * pp
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), str(WORKER), str(out), str(tmp_path / "checkpoint"), str(tp), str(pp)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=rank_environment(nproc))
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("decode")
    reference = decode(tmp_path, 1, 1)  # first: it writes the checkpoint the others load
    return {"tp1": reference, "tp2": decode(tmp_path, 2, 1), "pp2": decode(tmp_path, 1, 2)}


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_the_layout_decodes_the_tp1_tokens_with_the_same_log_probs(decoded, layout):
    reference, run = decoded["tp1"], decoded[layout]
    assert run["tokens"] == reference["tokens"]
    assert all(len(tokens) == 6 for tokens in run["tokens"])
    for expected, got in zip(reference["log_probs"], run["log_probs"]):
        assert got == pytest.approx(expected, abs=LOG_PROB_TOLERANCE)
