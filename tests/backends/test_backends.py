"""Backend choice logic (testable without a GPU) and the cpu backend's containment."""

import subprocess
import sys

import pytest

from megatron_hybrid.backends import BackendError, choose


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("cuda_available, missing, expected", [
    (True, [], "cuda"),
    (False, [], "cpu"),
    (True, ["mamba_ssm"], "cpu"),
])
def test_auto_prefers_cuda_only_when_it_can_run(cuda_available, missing, expected):
    assert choose("auto", cuda_available=cuda_available, missing_packages=missing) == expected


def test_forced_choices():
    assert choose("cpu", cuda_available=True, missing_packages=[]) == "cpu"
    assert choose("cuda", cuda_available=True, missing_packages=[]) == "cuda"
    with pytest.raises(BackendError, match="use backend=cpu"):
        choose("cuda", cuda_available=False, missing_packages=[])
    with pytest.raises(BackendError, match=r"megatron-hybrid\[gpu\]"):
        choose("cuda", cuda_available=True, missing_packages=["transformer_engine"])
    with pytest.raises(BackendError, match="choose one of auto, cpu, cuda"):
        choose("tpu", cuda_available=False, missing_packages=[])


def test_importing_the_package_patches_nothing():
    out = run_python(
        "import sys, megatron_hybrid, megatron_hybrid.backends, megatron_hybrid.pattern, "
        "megatron_hybrid.model.flavors, megatron_hybrid.cli\n"
        "import torch\n"
        "print('megatron.core' in sys.modules, 'mamba_ssm' in sys.modules, "
        "torch.overrides._get_current_function_mode_stack() == [], "
        "torch.cuda.current_device.__module__)")
    assert out == "False False True torch.cuda"


def test_megatron_core_refuses_to_load_before_a_backend():
    out = run_python(
        "try:\n    import megatron_hybrid.mcore\nexcept ImportError as err:\n    print(err)")
    assert "megatron_hybrid.backends.install()" in out


def test_cpu_backend_redirects_megatron_cuda_assumptions():
    out = run_python(
        "import torch\n"
        "from megatron_hybrid import backends\n"
        "backends.install('cpu')\n"
        "from megatron_hybrid.backends import cpu\n"
        "from megatron.core.ssm import mamba_mixer\n"
        "from megatron.core.tensor_parallel import random\n"
        "a = torch.zeros(2, device='cuda'); b = torch.ones(2, device=torch.cuda.current_device())\n"
        "with cpu.cuda_device_is('meta'):\n"
        "    c = torch.empty(3, device='cuda')\n"
        "print(a.device, b.device, c.device, a.cuda().device, a.type(), b.to('cuda').device)\n"
        "print(mamba_mixer.HAVE_MAMBA_SSM, type(mamba_mixer.RMSNormGated).__name__)\n"
        "random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)\n"
        "tracker = random.get_cuda_rng_tracker()\n"
        "outside = torch.get_rng_state()\n"
        "with tracker.fork():\n"
        "    x = torch.rand(1)\n"
        "with tracker.fork():\n"
        "    y = torch.rand(1)\n"
        "print(bool(x != y), bool(torch.equal(outside, torch.get_rng_state())))")
    devices, kernels, rng = out.splitlines()
    assert devices == "cpu cpu meta cpu torch.cuda.FloatTensor cpu"
    assert kernels == "True type"  # a real class, not unittest.mock's MagicMock
    assert rng == "True True"  # the tracker advances its own state and restores the default


def test_cpu_backend_keeps_large_tensors_in_the_heap():
    """glibc would give a 64 MiB tensor its own mmap and unmap it when freed, so every step
    of a long sequence faulted its activations in anew; the cpu backend keeps them in the
    heap (mallinfo2: hblkhd counts mmapped bytes, arena the heap's) and never trims it."""
    out = run_python(
        "import ctypes, torch\n"
        "from megatron_hybrid import backends\n"
        "backends.install('cpu')\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(name, ctypes.c_size_t) for name in 'arena ordblks smblks hblks "
        "hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.mallinfo2.restype = Info\n"
        "tensor = torch.ones(64 << 20, dtype=torch.uint8)\n"
        "held = libc.mallinfo2()\n"
        "del tensor\n"
        "print(held.hblkhd >> 20, held.arena >> 20, libc.mallinfo2().arena >> 20)")
    mmapped, heap_held, heap_after_free = map(int, out.split())
    assert mmapped < 64 and heap_held >= 64 and heap_after_free == heap_held
