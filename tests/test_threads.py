"""The test session's pinned thread counts (tests/conftest.py): this process, a child, and the
per-rank split a multi-rank launch gets."""

import os
import subprocess
import sys

import torch
from conftest import rank_environment


def test_this_process_and_its_children_run_at_the_pinned_thread_count():
    threads = int(os.environ["OMP_NUM_THREADS"])
    assert os.environ["MKL_NUM_THREADS"] == os.environ["OMP_NUM_THREADS"]
    assert torch.get_num_threads() == threads
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=300, env=rank_environment(1))
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout) == threads


def test_ranks_of_a_launch_share_the_sessions_threads():
    threads = int(os.environ["OMP_NUM_THREADS"])
    for nproc in (1, 2, 4):
        env = rank_environment(nproc)
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, threads // nproc))
        assert env["PATH"] == os.environ["PATH"]  # the rest of the environment is kept
