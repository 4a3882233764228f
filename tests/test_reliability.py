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
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_hybrid import reliability
from test_train import RECIPE, SMALL, cli, step_losses, train

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


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and max(step_losses(out), default=0) >= step):
        assert process.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.05)


def test_sigterm_finishes_the_step_saves_exits_0_and_resumes_to_the_same_losses(tmp_path):
    reference = tmp_path / "reference"
    train(reference, "train.max_steps=6")
    out = tmp_path / "preempted"
    process = subprocess.Popen(cli("train", str(RECIPE), *SMALL, f"output_dir={out}",
                                   "train.max_steps=6"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    stopped = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= stopped < 6 and max(step_losses(out)) == stopped
    assert f"preempted (SIGTERM): stopped after step {stopped}" in stdout
    resumed = train(out, "train.max_steps=6")
    assert "resuming from" in resumed.stdout
    assert step_losses(out) == step_losses(reference)  # exact, step by step


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The process of ``rank`` among a torchrun agent's children."""
    deadline = time.time() + 120
    while time.time() < deadline:
        children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
        for pid in children:
            with contextlib.suppress(FileNotFoundError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.1)
    raise TimeoutError(f"no rank {rank} under torchrun {torchrun_pid}")


def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(cli("train", str(RECIPE), *SMALL, f"output_dir={out}",
                                   "train.max_steps=8", nproc=2),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 2, process)
    os.kill(rank_pid(process.pid, 1), signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    stopped = int(latest.name.removeprefix("step_"))
    assert stopped < 8 and max(step_losses(out)) == stopped  # rank 0 stopped there too
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert f"preempted (signal on another rank): stopped after step {stopped}" in stdout


def test_a_dying_rank_stops_the_job_and_torchrun_restarts_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--max-restarts", "1", "-m", "megatron_hybrid",
               "train", str(RECIPE), *SMALL, f"output_dir={out}", "train.max_steps=4",
               "checkpoint.save_interval=2", "parallel.timeout_minutes=1"]
    # The bound: a hang (a survivor waiting forever on the dead rank) would hit this timeout.
    result = run(command, env={reliability.FAULT_ENV: "exit@step.3:1"}, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "injected fault: rank 1 dies after step 3" in result.stdout
    assert f"resuming from {out / 'checkpoints' / 'step_000002'}" in result.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"
    assert sorted(step_losses(out)) == [1, 2, 3, 4]


def test_nan_steps_are_skipped_counted_and_too_many_stop_the_run_with_a_diagnosis(tmp_path):
    out = tmp_path / "run"
    result = run(cli("train", str(RECIPE), *SMALL, f"output_dir={out}", "train.max_steps=8",
                     "train.max_bad_steps=2"),
                 env={reliability.FAULT_ENV: "nan@step.2,nan@step.4,nan@step.5"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("megatron-hybrid train: error: stopped at step 5: 3 bad steps "
                                "exceed train.max_bad_steps=2"), lines[-3:]
    assert "Traceback" not in result.stderr
    assert "step 2: non-finite loss nan or grad norm nan: update skipped" in result.stdout
    losses = step_losses(out)
    assert math.isfinite(losses[1]) and math.isfinite(losses[3])  # skipping kept weights finite
    assert (out / "checkpoints" / "latest").read_text() == "step_000005"
    diagnosis = json.loads((out / reliability.DIAGNOSIS).read_text())
    assert [bad["step"] for bad in diagnosis["bad_steps"]] == [2, 4, 5]
    assert [r["step"] for r in diagnosis["recent"]] == [1, 2, 3, 4, 5]
    assert diagnosis["checkpoint"].endswith("step_000005")


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_loss_spike_detector_counts_spikes_and_halts_past_the_limit(tmp_path, one_process_group):
    watchdog = reliability.Watchdog(max_bad_steps=0, loss_spike_factor=3.0, run_dir=tmp_path)
    for step in range(1, reliability.HISTORY + 1):
        watchdog.after_step(step, loss=2.0 + 0.01 * step, grad_norm=1.0, applied=True)
    assert not watchdog.stopping and not watchdog.bad_steps
    watchdog.after_step(reliability.HISTORY + 1, loss=5.0, grad_norm=1.0, applied=True)
    assert not watchdog.bad_steps  # 5.0 is under 3x the mean
    watchdog.after_step(reliability.HISTORY + 2, loss=9.0, grad_norm=1.0, applied=True)
    assert [bad["step"] for bad in watchdog.bad_steps] == [reliability.HISTORY + 2]
    assert watchdog.stopping
    with pytest.raises(reliability.TrainingHalted, match="train.max_bad_steps=0"):
        watchdog.finish(reliability.HISTORY + 2, tmp_path / "checkpoints" / "step_000022")
    assert json.loads((tmp_path / reliability.DIAGNOSIS).read_text())["bad_steps"][0]["loss"] == 9.0


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    common = [*SMALL, f"output_dir={out}", "scheduler.warmup_steps=0"]
    full = cli("train", str(RECIPE), *common, "train.max_steps=3", "checkpoint.save_interval=1")
    resume = cli("train", str(RECIPE), *common, "train.max_steps=1")
    script = (f"mount -t tmpfs -o size=80m tmpfs {disk} && "  # room for one checkpoint (51 MB)
              f"{shlex.join(full)} >{tmp_path}/full.out 2>{tmp_path}/full.err; "
              f"echo $? >{tmp_path}/full.rc; ls {out}/checkpoints >{tmp_path}/ls.out; "
              f"{shlex.join(resume)} >{tmp_path}/resume.out 2>{tmp_path}/resume.err")
    result = run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], timeout=600)
    assert result.returncode == 0, (tmp_path / "resume.err").read_text()[-3000:]
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    error = (tmp_path / "full.err").read_text().strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        "megatron-hybrid train: error: no space left on the device writing "
        f"{out / 'checkpoints' / 'step_000002.partial'}"), error
    assert "Traceback" not in "\n".join(error)
    assert (tmp_path / "ls.out").read_text().split() == ["latest", "step_000001"]
    resumed = (tmp_path / "resume.out").read_text()
    assert f"resuming from {out / 'checkpoints' / 'step_000001'}" in resumed
