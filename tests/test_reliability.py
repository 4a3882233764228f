"""Faults a run survives, injected for real (see docs/reliability.md):

- SIGKILL at every named point of a checkpoint save and at random moments inside saves: the
  previous checkpoint always loads and ``latest`` never names a partial one;
- SIGTERM / SIGUSR1: the run finishes its step, saves, exits 0, and resumes to the same losses;
  a signal to one rank stops every rank at the same step;
- a rank dying: torchrun stops the job, and ``--max-restarts 1`` resumes from the checkpoint;
- NaN losses: the step is skipped, counted, and past train.max_bad_steps the run stops with a
  checkpoint and numerics.json; loss spikes are counted when enabled;
- a full disk (a real tmpfs): the save fails in one line and the previous checkpoint survives.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_hybrid import reliability
from tests.test_train import RECIPE, SMALL, cli, step_losses, train

WORKER = Path(__file__).resolve().parent / "workers" / "save_crash.py"
SAVE_POINTS = ["started", "shards-written", "meta-written", "renamed", "pointer-written",
               "latest-replaced", "pruning"]
"""Every ``reliability.save_point`` in ``Checkpointer.save``."""
RANDOM_KILLS = 3
SAVE_TRIALS = len(SAVE_POINTS) + RANDOM_KILLS


def run(command, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def save_trial(out: Path, point: str | None, delay: float) -> str:
    """Resume ``out``, then save until SIGKILL (at ``point``, else ``delay`` s into saving);
    returns the step the trial loaded."""
    env = {**os.environ, reliability.FAULT_ENV: f"kill@save.{point}" if point else ""}
    process = subprocess.Popen(
        [sys.executable, str(WORKER), "forever", str(RECIPE), *SMALL, f"output_dir={out}",
         "checkpoint.keep_last=2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=env, start_new_session=True)
    lines = iter(process.stdout.readline, "")
    loaded = next(line for line in lines if line.startswith("loaded")).strip()
    assert next(lines).strip() == "saving", loaded
    if point is None:
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=120) == -signal.SIGKILL
    with contextlib.suppress(ProcessLookupError):  # the checkpoint writer's helpers too
        os.killpg(process.pid, signal.SIGKILL)
    return loaded


def latest_step(checkpoints: Path) -> int:
    """The step ``latest`` names, after checking that folder is a complete checkpoint."""
    folder = checkpoints / (checkpoints / "latest").read_text()
    assert not folder.name.endswith(".partial")
    assert (folder / "metadata.json").is_file() and (folder / "meta.json").is_file()
    return int(folder.name.removeprefix("step_"))


def test_kill_9_inside_checkpoint_saves_10_trials_previous_checkpoint_loads(tmp_path):
    assert SAVE_TRIALS == 10  # the count in this test's name and in docs/reliability.md
    out = tmp_path / "run"
    train(out, "train.max_steps=1", "scheduler.warmup_steps=0")  # the first checkpoint
    checkpoints = out / "checkpoints"
    rng = random.Random(0)
    kills = [*SAVE_POINTS, *[None] * RANDOM_KILLS]
    for point in kills:
        before = latest_step(checkpoints)
        loaded = save_trial(out, point, rng.uniform(0, 1.5))  # a tiny save takes ~1 s
        assert loaded == f"loaded {before}", (point, loaded)
        assert latest_step(checkpoints) >= before, point
    final = run([sys.executable, str(WORKER), "0", str(RECIPE), *SMALL, f"output_dir={out}"])
    assert f"loaded {latest_step(checkpoints)}" in final.stdout, final.stderr[-2000:]
