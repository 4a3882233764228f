"""The command line: its frozen surface, and bad input refused in one line, writing nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid.cli import build_parser

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pretrain.yaml")


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_hybrid", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_frozen_cli_surface():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(commands) == ["bench", "ckpt", "config", "convert", "demo", "distill", "dpo",
                                "eval", "generate", "grpo", "launch", "params", "pipeline",
                                "plan", "prune", "quantize", "reward-model", "serve", "sft",
                                "train"]
    params = {a.dest for a in commands["params"]._actions} - {"help"}
    assert params == {"flavor", "pp", "json"}
    train = {a.dest for a in commands["train"]._actions} - {"help"}
    assert train == {"recipe", "overrides"}
    config = {a.dest for a in commands["config"]._actions} - {"help"}
    assert config == {"recipe", "overrides", "backend", "json"}


# The catalogue (test_bad_inputs.py) runs its cases in-process; these two run the real
# command in a fresh process, where import-time warnings would reach stderr too.
BAD_TRAIN_INPUTS = [
    (["train.max_step=3"], "train.max_step: unknown key; did you mean train.max_steps?"),
    (["checkpoint.load=/nonexistent/ckpt"], "checkpoint /nonexistent/ckpt does not exist"),
]


@pytest.mark.parametrize("overrides, message", BAD_TRAIN_INPUTS)
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path, overrides, message):
    out = tmp_path / "run"
    result = run_cli("train", RECIPE, f"output_dir={out}", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-hybrid train: error: "), lines
    assert message in lines[0]
    assert not out.exists()


def test_missing_recipe_and_unknown_flavor(tmp_path):
    missing = run_cli("train", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "recipe file not found" in missing.stderr
    flavor = run_cli("params", "--flavor", "nano-v2-13b")
    assert flavor.returncode == 2
    assert flavor.stderr.strip().splitlines() == [
        flavor.stderr.strip()] and "did you mean 'nano-v2-12b'?" in flavor.stderr
