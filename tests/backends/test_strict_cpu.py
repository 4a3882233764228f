"""The strict cpu backend: the CUDA redirect serves Megatron-Core and torch, and refuses project
code, which must name its device (``backends.device()``) to run on GPUs.

Project code is recognised by its file: the probes below are compiled under a file name inside
the package (a module that does not exist), so they run as project code would, without
shipping a defect in the package. The same probes under a test's file name are the control.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.backends import cpu

backends.install("cpu")

PACKAGE = Path(backends.__file__).resolve().parents[1]
PROJECT_FILE = PACKAGE / "engine" / "strict_probe.py"
OUTSIDE_FILE = Path(__file__).resolve()

USES_OF_THE_REDIRECT = {
    "Tensor.cuda()": "torch.ones(2).cuda()",
    "device='cuda'": "torch.zeros(2, device='cuda')",
    "Tensor.to('cuda')": "torch.ones(2).to('cuda')",
    "a CUDA device index": "torch.empty(2, device=0)",
    "Module.cuda()": "torch.nn.Linear(2, 2).cuda()",
    "torch.cuda.current_device()": "torch.empty(2, device=torch.cuda.current_device())",
    "torch.cuda.get_rng_state()": "torch.cuda.get_rng_state()",
    "torch.cuda.manual_seed()": "torch.cuda.manual_seed(1)",
    "torch.cuda.synchronize()": "torch.cuda.synchronize()",
    "torch.cuda.Event()": "torch.cuda.Event(enable_timing=True)",
}


def run_as(filename: Path, source: str):
    exec(compile(source, str(filename), "exec"), {"torch": torch})


def test_the_suite_runs_strict():
    assert os.environ[cpu.STRICT_ENVIRONMENT_VARIABLE] == "1" and cpu._strict


@pytest.mark.parametrize("source", USES_OF_THE_REDIRECT.values(), ids=USES_OF_THE_REDIRECT)
def test_project_code_that_leans_on_the_redirect_fails(source):
    with pytest.raises(cpu.StrictCpuError, match=r"megatron_hybrid/engine/strict_probe.py:1: .*"
                                                 r"backends.device\(\)"):
        run_as(PROJECT_FILE, source)
    run_as(OUTSIDE_FILE, source)  # the control: the same call from elsewhere is redirected


def test_megatron_core_and_torch_keep_the_redirect():
    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import process_groups

    # Megatron-Core seeds and reads CUDA generators; torch.manual_seed seeds CUDA itself.
    run_as(PROJECT_FILE, "torch.manual_seed(3)")
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    tracker = mcore.tensor_parallel.get_cuda_rng_tracker()
    try:
        run_as(PROJECT_FILE, "from megatron_hybrid.parallel import process_groups\n"
                             "process_groups.seed_everything(3)")
        states = tracker.get_states()
        assert states and all(state.device.type == "cpu" for state in states.values())
    finally:
        tracker.reset()
        process_groups.destroy_distributed()


def test_stream_stand_ins_stay_classes():
    """Libraries annotate with them at import (transformers: ``torch.cuda.Stream | None``)."""
    assert isinstance(torch.cuda.Stream | None, type(int | None))
    assert isinstance(torch.cuda.current_stream(), torch.cuda.Stream)  # a Megatron-Core idiom


def test_event_stand_in_measures_wall_clock_time():
    """Megatron-Core's static generation loop divides ``elapsed_time`` (ms) between the events
    of consecutive steps; an inert event returned None there."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.05)
    end.record()
    end.synchronize()
    assert 50 <= start.elapsed_time(end) < 5000


def test_project_code_that_names_its_device_runs():
    run_as(PROJECT_FILE, textwrap.dedent("""
        from megatron_hybrid import backends
        batch = backends.to_device({"tokens": torch.ones(2, dtype=torch.long)})
        assert batch["tokens"].device == backends.device() == torch.device("cpu")
    """))


def test_without_the_setting_the_redirect_serves_everyone(tmp_path):
    """Users' cpu runs are not strict: only the suite opts in."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        from megatron_hybrid import backends
        backends.install("cpu")
        import torch
        exec(compile("x = torch.ones(2).cuda()", {str(PROJECT_FILE)!r}, "exec"), {{"torch": torch}})
        print("redirected")
    """))
    environment = {**os.environ}
    environment.pop(cpu.STRICT_ENVIRONMENT_VARIABLE)
    result = subprocess.run([sys.executable, str(probe)], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "redirected", result.stderr
