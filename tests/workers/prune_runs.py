"""Runs shared by the prune and distill tests, made once per test session through the CLI:
a shortly pretrained tiny-nano-v2-12b, and its Minitron prune (recipes/tiny/prune.yaml) at
PP=1 and PP=2. ``prune_cli.py`` beside this file is the ``megatron-hybrid`` command line."""

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

from conftest import rank_environment

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "tiny"
CLI = Path(__file__).with_name("prune_cli.py")
SMALL = ["train.seq_length=64", "train.micro_batch_size=2", "logging.progress_bar=off"]
PRETRAIN_STEPS = 160
"""Long enough that pruning costs the teacher a gap distillation can be measured on (0.022-0.031
nats over three seeds; after 40 steps it cost about 0.01, which read as 79% closed on one
machine and 135% on another)."""
PRUNE_DATA = ["prune.calibration_samples=16", "prune.heldout_samples=16"]


def command(*args, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(CLI), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), str(CLI), *args]


def run(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    result = subprocess.run(command(*args, nproc=nproc), capture_output=True, text=True,
                            timeout=1800, cwd=ROOT, env=rank_environment(nproc))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def shared_base(tmp_path_factory) -> Path:
    """The folder the runs are made in once per test session: with pytest-xdist the session's
    workers share it (each worker's own base folder sits inside it)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "prune-runs"


@contextlib.contextmanager
def exclusive(base: Path):
    """Held while a run is checked for and made, so a second worker waits for the first's."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pretrained(base: Path) -> Path:
    """The final checkpoint of a short tiny pretraining run (made once under ``base``)."""
    out = base / "pretrain"
    checkpoint = out / "checkpoints" / f"step_{PRETRAIN_STEPS:06d}"
    with exclusive(base):
        if not checkpoint.is_dir():
            run("train", str(RECIPES / "pretrain.yaml"), *SMALL, f"output_dir={out}",
                "train.global_batch_size=4", f"train.max_steps={PRETRAIN_STEPS}",
                "train.eval_interval=1000", "scheduler.warmup_steps=2")
    return checkpoint


def pruned(base: Path, pp: int) -> Path:
    """The run directory of recipes/tiny/prune.yaml applied to :func:`pretrained` at ``pp``."""
    out = base / f"prune-pp{pp}"
    source = pretrained(base)
    with exclusive(base):
        if not (out / "prune_report.json").is_file():
            run("prune", str(RECIPES / "prune.yaml"), *SMALL, *PRUNE_DATA, f"output_dir={out}",
                f"checkpoint.load={source}", f"parallel.pp={pp}", nproc=pp)
    return out
