"""Context parallel end to end, through the CLI a user types.

- ``torchrun --nproc-per-node 2 ... train recipes/tiny/pretrain.yaml parallel.cp=2`` trains to
  the losses of the same run at cp=1 (same seed, so the same initial weights);
- the tiny long-context stage (4x the sequence, CP=2) loads a previous stage's weights and
  trains from them.
The layout-by-layout CP parity (CP=2, TP2xCP2, PP2xCP2, grad norms) is in test_layout_parity.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rank_environment

from megatron_hybrid import backends

backends.install("cpu")

from megatron_hybrid.parallel.context_parallel import (  # noqa: E402
    ContextParallelError,
    load_balanced_positions,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tiny"
# The tiny 12B base (the model the long-context stage continues) at a small size of batch and run.
SMALL = ["model.flavor=tiny-nano-v2-12b", "train.seq_length=128", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.log_interval=1", "train.eval_batches=1",
         "scheduler.warmup_steps=1", "logging.progress_bar=off", "logging.tensorboard=false",
         "logging.plot=false"]


def train(recipe: str, out: Path, *overrides, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([] if nproc == 1 else
                ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)])
    command = [sys.executable, *launcher, "-m", "megatron_hybrid", "train", str(RECIPES / recipe),
               f"output_dir={out}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=rank_environment(nproc))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def step_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_load_balanced_positions_follow_megatron_chunking():
    # 2*cp chunks; rank r holds chunks r and 2*cp-1-r (Megatron's get_batch_on_this_cp_rank)
    assert load_balanced_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balanced_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    shares = [load_balanced_positions(16, 4, rank) for rank in range(4)]
    assert sorted(int(p) for share in shares for p in share) == list(range(16))
    with pytest.raises(ContextParallelError, match="multiple of 4"):
        load_balanced_positions(6, 2, 0)


@pytest.fixture(scope="module")
def cp1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp1")
    train("pretrain.yaml", out, *SMALL, "train.max_steps=4")
    return out


def test_torchrun_cp2_reproduces_cp1_losses(cp1_run, tmp_path):
    train("pretrain.yaml", tmp_path, *SMALL, "train.max_steps=4", "parallel.cp=2", nproc=2)
    meta = json.loads((tmp_path / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 1, "pp": 1, "cp": 2, "ep": 1, "dp": 1}
    reference = step_losses(cp1_run)
    # Measured over 4 steps (seeds 1234, 1, 2; 1 thread too): the loss falls 0.30-0.40.
    assert len(reference) == 4 and reference[-1] < reference[0] - 0.15
    assert step_losses(tmp_path) == pytest.approx(reference, rel=1e-5)


def test_long_context_stage_continues_from_loaded_weights_at_cp2(cp1_run, tmp_path):
    start = cp1_run / "checkpoints" / "step_000004"
    result = train("long_context.yaml", tmp_path, f"checkpoint.load={start}", "train.max_steps=2",
                   "train.eval_batches=1", "scheduler.warmup_steps=1", "logging.progress_bar=off",
                   nproc=2)
    assert f"initial weights from {start}" in result.stdout
    meta = json.loads((tmp_path / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["layout"]["cp"] == 2 and meta["train_state"]["tokens"] == 2 * 4 * 1024
    # The control is the same model before its 4 steps: fresh weights start near ln(vocab);
    # the loaded ones predict better at 8x the sequence length they were trained on, about as
    # well as at their own. Measured (seeds 1234, 1, 2; 1 thread too): first 6.43-6.48, 0.47-0.53
    # under the fresh weights' first loss (6.95-6.96) and 0.13-0.19 under the loaded run's last.
    first, cp1_losses = step_losses(tmp_path)[0], step_losses(cp1_run)
    assert cp1_losses[0] == pytest.approx(math.log(1024), abs=0.1)
    assert first < cp1_losses[0] - 0.25
    assert first < cp1_losses[-1] + 0.1
