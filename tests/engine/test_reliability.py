"""Faults a run survives, injected for real (see docs/reliability.md):

- SIGKILL at every point of a checkpoint save (one inside a shard file's write) and after a
  random number of them: the previous checkpoint always loads and ``latest`` never names a
  partial one; each kill's landing point is read from the save's own trace;
- SIGTERM / SIGUSR1: the run finishes its step, saves, exits 0, and resumes to the same losses;
  a signal to one rank stops every rank at the same step;
- a rank dying: torchrun stops the job, and ``--max-restarts 1`` resumes from the checkpoint;
- NaN losses: the step is skipped (weights, Adam state and LR schedule bitwise unchanged, while
  the next step changes all three), counted, and past train.max_bad_steps the run stops with a
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
import torch
import torch.distributed as dist
from conftest import rank_environment
from test_train import RECIPE, SMALL, cli, step_losses, train

from megatron_hybrid import reliability

WORKERS = Path(__file__).resolve().parents[1] / "workers"
SAVE_CRASH_WORKER = WORKERS / "save_crash.py"
SAVE_PHASES = {
    "started": "before the shard writes",
    "shard-write": "inside a shard write",
    "shards-written": "after the shard writes",
    "meta-written": "after the shard writes",
    "renamed": "in the rename and latest update",
    "pointer-written": "in the rename and latest update",
    "latest-replaced": "in the rename and latest update",
    "pruning": "while pruning old checkpoints",
}
"""Every point a save passes (``reliability.save_point`` in ``Checkpointer.save``, and the
worker's ``shard-write`` after each tensor put into a shard file), by the phase it is in."""
RANDOM_KILLS = 2
"""Kills from outside after a random number of the save's points (anywhere up to the next)."""
SAVE_TRIALS = len(SAVE_PHASES) + RANDOM_KILLS


def run(command, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def save_crash_worker(out: Path, saves: str, env: dict, log: Path) -> subprocess.Popen:
    """The worker in a session of its own (a kill takes its writers too), stderr to ``log``
    (a pipe nobody reads would fill up and stall it)."""
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(SAVE_CRASH_WORKER), saves, str(RECIPE), *SMALL,
             f"output_dir={out}", "checkpoint.keep_last=2"], stdout=subprocess.PIPE,
            stderr=stderr, text=True, env={**os.environ, **env}, start_new_session=True)


def save_trace(trace: Path) -> list[str]:
    return trace.read_text().split() if trace.exists() else []


def complete_saves(out: Path, saves: int, trace: Path, log: Path) -> list[str]:
    """Resume ``out`` and save ``saves`` checkpoints without a fault; the points passed."""
    process = save_crash_worker(out, str(saves), {reliability.SAVE_TRACE_ENV: str(trace)}, log)
    process.communicate(timeout=600)
    assert process.returncode == 0, log.read_text()[-3000:]
    return save_trace(trace)


def kill_trial(out: Path, trace: Path, log: Path, *, point: str | None = None,
               after_points: int | None = None) -> tuple[str, list[str]]:
    """Resume ``out``, then save until SIGKILL: at ``point`` (the save kills itself there) or
    from outside once the saves have passed ``after_points`` points. Returns the step the
    trial loaded and the points its saves passed before the kill."""
    trace.unlink(missing_ok=True)
    process = save_crash_worker(out, "forever", {
        reliability.FAULT_ENV: f"kill@save.{point}" if point else "",
        reliability.SAVE_TRACE_ENV: str(trace)}, log)
    loaded = next((line.strip() for line in iter(process.stdout.readline, "")
                   if line.startswith("loaded")), None)
    assert loaded, log.read_text()[-3000:]  # the worker died before loading
    if after_points is not None:
        deadline = time.time() + 600
        while len(save_trace(trace)) < after_points:
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=600) == -signal.SIGKILL, log.read_text()[-3000:]
    with contextlib.suppress(ProcessLookupError):  # writers orphaned by a kill from outside
        os.killpg(process.pid, signal.SIGKILL)
    return loaded, save_trace(trace)


def latest_step(checkpoints: Path) -> int:
    """The step ``latest`` names, after checking that folder is a complete checkpoint."""
    folder = checkpoints / (checkpoints / "latest").read_text()
    assert not folder.name.endswith(".partial")
    assert (folder / "metadata.json").is_file() and (folder / "meta.json").is_file()
    return int(folder.name.removeprefix("step_"))


def shard_bytes(folder: Path) -> int:
    return sum(shard.stat().st_size for shard in folder.glob("*.distcp"))


def test_kill_9_at_every_point_of_a_save_and_at_random_progress_previous_checkpoint_loads(
        tmp_path):
    assert SAVE_TRIALS == 10  # the count in docs/reliability.md
    out, trace, log = tmp_path / "run", tmp_path / "trace", tmp_path / "worker.err"
    train(out, "train.max_steps=1", "scheduler.warmup_steps=0")  # a checkpoint with Adam state
    passed = complete_saves(out, 2, trace, log)  # the second prunes the first
    assert set(passed) == set(SAVE_PHASES), sorted(set(passed))  # the list above is the save's
    one_save = passed[len(passed) - passed[::-1].index("started") - 1:]
    checkpoints = out / "checkpoints"
    complete_shards = shard_bytes(checkpoints / f"step_{latest_step(checkpoints):06d}")
    rng = random.Random(0)
    trials = [*({"point": point} for point in SAVE_PHASES),
              *({"after_points": rng.randint(1, len(one_save))} for _ in range(RANDOM_KILLS))]
    landed = []
    for trial in trials:
        before = latest_step(checkpoints)
        loaded, points = kill_trial(out, trace, log, **trial)
        assert loaded == f"loaded {before}", (trial, loaded)
        if "point" in trial:  # the save died where it was asked to
            assert points[-1] == trial["point"], (trial, points[-3:])
        landed.append(SAVE_PHASES[points[-1]])
        if trial.get("point") == "shard-write":  # one tensor of a shard file is written
            killed = checkpoints / f"step_{before + 1:06d}.partial"
            assert 0 < shard_bytes(killed) < complete_shards, trial
            assert not (killed / ".metadata").exists()
        assert latest_step(checkpoints) >= before, trial
    assert set(landed) == set(SAVE_PHASES.values()), landed  # "inside a shard write" among them
    final = run([sys.executable, str(SAVE_CRASH_WORKER), "0", str(RECIPE), *SMALL,
                 f"output_dir={out}"], timeout=600)
    assert f"loaded {latest_step(checkpoints)}" in final.stdout, final.stderr[-2000:]


def logged_step(out: Path) -> int:
    """The last step the run's metrics hold (0 before the first, or while a line is half
    written)."""
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return max(step_losses(out), default=0)
    return 0


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    """Wait for the run's own progress, however slow the machine (the deadline only stops a
    hang)."""
    deadline = time.time() + 900
    while logged_step(out) < step:
        assert process.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.01)


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
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=rank_environment(2))
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
    result = run(command, env={**rank_environment(2), reliability.FAULT_ENV: "exit@step.3:1"},
                 timeout=900)
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


def test_a_skipped_nan_step_leaves_weights_adam_state_and_lr_schedule_bitwise_unchanged(
        tmp_path):
    report = tmp_path / "steps.json"
    result = run([sys.executable, str(WORKERS / "skipped_step.py"), str(report), str(RECIPE),
                  *SMALL, f"output_dir={tmp_path / 'run'}", "train.max_steps=3"],
                 env={reliability.FAULT_ENV: "nan@step.2"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report.read_text())
    names, (_, skipped, normal) = report["names"], report["steps"]
    assert all(names[key] == names["weights"] for key in ("exp_avg", "exp_avg_sq", "step"))
    assert (skipped["step"], skipped["applied"], normal["applied"]) == (2, False, True)
    assert skipped["changed"] == {category: [] for category in names}
    # The same comparison sees the next (normal) step change every weight and Adam tensor,
    # the scheduler's step count and every group's LR (warmup: a skipped step keeps its LR).
    learning_rates = [name for name in names["schedule"] if name.endswith(" lr")]
    assert normal["changed"] == {**names, "schedule": sorted(
        [*learning_rates, "scheduler num_steps"])}


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_loss_spike_detector_counts_spikes_and_halts_past_the_limit(tmp_path, one_process_group):
    watchdog = reliability.Watchdog(max_bad_steps=0, loss_spike_factor=3.0, run_dir=tmp_path,
                                    device=torch.device("cpu"))
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
