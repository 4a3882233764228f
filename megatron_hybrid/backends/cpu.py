"""The cpu backend: Megatron-Core 0.16.1's real engine on gloo with pure-PyTorch kernels.

Megatron-Core assumes CUDA in many places. ``install()`` makes those assumptions hold on a
CPU, once per process and only when asked. What each piece serves (Megatron-Core 0.16.1):

- Mamba kernels registered as ``mamba_ssm`` / ``causal_conv1d`` (``kernels.register``) before
  Megatron-Core is imported: ``ssm/mamba_mixer.py`` binds them at import (and otherwise makes
  ``ExtendedRMSNorm`` a MagicMock); ModelOpt's megatron plugin imports ``mamba_ssm`` too.
- ``torch.cuda.current_device()`` returns the redirect target (the CPU, or ``meta`` inside
  :func:`cuda_device_is`) as a device: Megatron-Core passes it as a device in ~100 places
  (``utils.py`` global memory buffer, ``distributed/param_and_grad_buffer.py``,
  ``pipeline_parallel/p2p_communication.py``, ``tensor_parallel/layers.py`` forward and
  backward, ``ssm/mamba_mixer.py``).
- ``_CudaDeviceRedirect``, a TorchFunctionMode sending the rest to the same target:
  ``device='cuda'`` literals (``optimizer/optimizer.py`` FP32Optimizer ``_scale``,
  ``optimizer/clip_grads.py``, ``pipeline_parallel/schedules.py`` token count,
  ``tensor_parallel/data.py``), ``Tensor.cuda()``, and the
  ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks of ``optimizer/clip_grads.py``,
  ``optimizer/optimizer.py`` and ``optimizer/distrib_optimizer.py``. It sees every torch call
  made from Python (about 2,400 per training step of the benchmark's 22.7M model) at ~1.4 us
  each over a plain call: ~3.4 ms of a ~1.3 s step, below the step-to-step noise, so it stays
  on the stack rather than being traded for patches of each call site (see
  docs/performance.md).
- other ``torch.cuda`` stand-ins: ``synchronize``/``empty_cache`` (no-ops),
  ``Stream``/``current_stream``/``stream`` (inert objects used by DDP overlap), ``Event``
  (inert but for a wall-clock ``record``/``elapsed_time``: timers and the static generation
  loop's per-token latency), ``nvtx`` ranges, and the RNG functions (mapped to the CPU generator).
- Dynamic inference (``inference/engines/dynamic_engine.py``): the kernels register
  ``flash_attn`` too (a paged KV cache in torch), and :func:`_patch_megatron_dynamic_inference`
  swaps its Triton tensor ops and KV append for torch.
- Mixture of experts: ``transformer/moe/moe_utils.py`` binds ``te_general_gemm`` only when
  Transformer Engine imports (line 34) yet the router's gating GEMM tests it unguarded (line
  1192, and 1225 in backward); :func:`_patch_megatron_moe` binds it to None, which selects
  Megatron-Core's own ``torch.mm`` path there (its other TE-fused MoE ops check ``HAVE_TE``).
  Expert parallelism: the all-to-all token dispatcher's splits reach gloo as numpy, as its
  host copy makes them of a CUDA tensor (:func:`_host_copy`); its copy stream's event can be
  waited on (``_InertStream.record_event``); expert tensor parallelism's gathers of unequal
  token counts run on gloo (:func:`_gloo_accepts_uneven_lists`).
- ``tensor_parallel/random.py``: ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and
  set the CPU generator, so ``CudaRNGStatesTracker.fork()`` (used by ``MambaMixer`` init and
  tensor-parallel weight init) and ``model_parallel_cuda_manual_seed`` work as on a GPU; its
  "CPU RNG state changed within GPU RNG context" warning is filtered (same generator here).
- Denormal floats are flushed to zero on every intra-op thread
  (:func:`flush_denormals_on_every_thread`): the SSD scan's decays underflow towards them,
  and x86 arithmetic on denormals, matmuls included, runs up to ~100x slower.
- Freed memory stays in the heap (:func:`keep_freed_memory_in_heap`, glibc only): by default
  glibc serves each large tensor by a fresh ``mmap`` and unmaps it when freed, so every
  activation of a long sequence is page-faulted in anew (one Mamba layer at 16k tokens spent
  over half its time in the kernel doing so, and its time per token grew 4x from 1k).
- ModelOpt 0.43 ``prune/plugins/mcore_minitron.py`` (``drop_mcore_language_model_layers``)
  all-gathers a 0-d tensor, which gloo rejects ("invalid tensor size ... expected (), got (1)");
  :func:`gloo_accepts_scalar_all_gather` gives such inputs one dimension, only around pruning.
- ``jit.py`` makes Megatron-Core's fused functions ``torch.compile``'d; each torchrun rank gets
  its own inductor cache (``backends.separate_compile_caches``, on every backend) so ranks
  compiling on a cold cache do not load each other's kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from megatron_hybrid.backends import kernels

MEGATRON_CORE_VERSION = "0.16.1"

STRICT_ENVIRONMENT_VARIABLE = "MEGATRON_HYBRID_STRICT_CPU"
"""Set to 1 (the test suite does, for itself and every process it starts) to make the
redirect refuse calls from project code: see :class:`StrictCpuError`."""

_redirect: "_CudaDeviceRedirect | None" = None
_strict = False

_PROJECT_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_BACKENDS_DIR = str(Path(__file__).resolve().parent) + os.sep
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep


class StrictCpuError(RuntimeError):
    """Project code used the CUDA device on the strict cpu backend.

    The redirect exists for Megatron-Core's hard-coded CUDA calls; project code that leans on
    it (``.cuda()``, ``device="cuda"``, the ``torch.cuda`` stand-ins) runs here and fails or
    misplaces tensors on GPUs. Project code names its device: ``backends.device()``.
    """


def _project_caller(skip_torch: bool) -> str | None:
    """``file:line`` of the code that made the redirected call when it is project code outside
    ``backends/``; None for Megatron-Core, torch and everything else. With ``skip_torch`` the
    frames of torch's Python functions are skipped, so ``module.cuda()`` names its caller."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_BACKENDS_DIR) or (skip_torch and filename.startswith(_TORCH_DIR)):
            frame = frame.f_back
            continue
        if filename.startswith(_PROJECT_DIR):
            return f"{os.path.relpath(filename, Path(_PROJECT_DIR).parent)}:{frame.f_lineno}"
        return None
    return None


def _refuse_project_caller(what: str, *, skip_torch: bool = False) -> None:
    if not _strict:
        return
    caller = _project_caller(skip_torch)
    if caller is not None:
        raise StrictCpuError(f"{caller}: {what} leans on the cpu backend's CUDA redirect; name "
                             f"the device with megatron_hybrid.backends.device() (the strict "
                             f"cpu backend, {STRICT_ENVIRONMENT_VARIABLE}=1, refuses this "
                             f"because it fails on GPUs)")


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a CUDA device index
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceRedirect(TorchFunctionMode):
    """Send tensors that Megatron-Core places on ``cuda`` to ``self.target`` instead."""

    def __init__(self):
        super().__init__()
        self.target = torch.device("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            _refuse_project_caller("Tensor.cuda()", skip_torch=True)
            return args[0].to(self.target)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # A CPU float tensor plays the role of a cuda one in the optimizer's type checks.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            _refuse_project_caller(f"device={kwargs['device']!r}", skip_torch=True)
            kwargs["device"] = self.target
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            _refuse_project_caller(f"Tensor.to({args[1]!r})", skip_torch=True)
            args = (args[0], self.target, *args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """Stands in for torch.cuda.Stream / Event: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        _refuse_project_caller("torch.cuda.Stream / Event")

    def __getattr__(self, name):
        return _no_op

    def record_event(self, event=None) -> "_InertStream":
        """An event to wait on: the all-to-all token dispatcher records one on its copy stream
        and later synchronizes it (``transformer/moe/token_dispatcher.py:895`` and ``:899``)."""
        return _InertStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _TimedEvent(_InertStream):
    """Stands in for torch.cuda.Event with a wall-clock time: Megatron-Core's static
    generation loop records one per step and divides their ``elapsed_time`` (milliseconds)
    by 1e3 (``inference/text_generation_controllers/text_generation_controller.py:1163`` and
    ``:1361``), which an inert event's None breaks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded_at = None

    def record(self, stream=None):
        self.recorded_at = time.perf_counter()

    def elapsed_time(self, end_event: "_TimedEvent") -> float:
        return (end_event.recorded_at - self.recorded_at) * 1e3


def _no_op(*args, **kwargs):
    return None


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed):
    torch.default_generator.manual_seed(int(seed))


def _stand_in(name: str, function):
    """``function`` in place of ``torch.cuda.<name>``, refused to project code when strict;
    torch's own calls (``torch.manual_seed`` seeds CUDA too) and Megatron-Core's pass."""

    def stand_in(*args, **kwargs):
        _refuse_project_caller(f"torch.cuda.{name}()")
        return function(*args, **kwargs)

    return stand_in


def _patch_torch_cuda() -> None:
    stand_ins = {
        # A device, not an index: a mode is off while its own handler runs, so allocations
        # inside autograd's backward (Megatron's linears allocate there) never reach the
        # redirect.
        "current_device": lambda: _redirect.target,
        "synchronize": _no_op,
        "empty_cache": _no_op,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "get_rng_state": _cpu_rng_state,
        "set_rng_state": _set_cpu_rng_state,
        "manual_seed": _seed_cpu_generator,
        "manual_seed_all": _seed_cpu_generator,  # torch.manual_seed itself calls this one
    }
    for name, function in stand_ins.items():
        setattr(torch.cuda, name, _stand_in(name, function))
    # Classes stay classes (``torch.cuda.Stream | None`` annotations are evaluated at import);
    # their constructor refuses project code.
    for name in ("Stream", "current_stream", "default_stream"):
        setattr(torch.cuda, name, _InertStream)
    torch.cuda.Event = _TimedEvent
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    torch.cuda.nvtx.range_push = _no_op
    torch.cuda.nvtx.range_pop = _no_op


def _patch_megatron_rng() -> None:
    from megatron_hybrid.mcore import tensor_parallel_random

    tensor_parallel_random._get_cuda_rng_state = _cpu_rng_state
    tensor_parallel_random._set_cuda_rng_state = _set_cpu_rng_state
    # fork() warns when the CPU generator moves inside a "GPU" RNG context; here the two are
    # the same generator by design, so the warning would fire on every fork.
    logging.getLogger(tensor_parallel_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())


def _patch_megatron_dynamic_inference() -> None:
    """The dynamic inference engine's Triton kernels, which do not run on the CPU, replaced by
    torch: the tensor ops ``ssm/mamba_mixer.py`` binds at import (line 22), and the KV-cache
    append of ``inference/contexts/dynamic_context.py``, whose own torch fallback runs when
    the Triton kernel is None (line 922)."""
    from megatron_hybrid.backends.kernels import tensor_ops
    from megatron_hybrid.mcore import (
        dynamic_context_module,
        inference_communication_module,
        mamba_mixer_module,
    )

    for name in ("tensor_get_slice_after", "tensor_merge", "tensor_masked_update"):
        setattr(mamba_mixer_module, name, getattr(tensor_ops, name))
    dynamic_context_module.triton_append_key_value_cache = None
    # The pipeline stages' broadcasts of logits and tokens assert CUDA tensors
    # (inference/communication_utils.py:29-31); here they are CPU tensors.
    inference_communication_module._is_cuda = _is_present


def _patch_megatron_moe() -> None:
    """The router's gating GEMM on torch (``transformer/moe/moe_utils.py:1192``): without
    Transformer Engine the module never binds ``te_general_gemm`` and the router's first
    forward raises NameError; None is the value its own check expects for "no TE". And the
    all-to-all dispatcher's host copies (:func:`_host_copy`) and uneven collectives
    (:func:`_gloo_accepts_uneven_lists`)."""
    from megatron_hybrid.mcore import moe_utils_module, token_dispatcher_module

    if not moe_utils_module.HAVE_TE:
        moe_utils_module.te_general_gemm = None
    token_dispatcher_module.maybe_move_tensor_to_cpu = _host_copy
    _gloo_accepts_uneven_lists()


def _gloo_accepts_uneven_lists() -> None:
    """``torch.distributed.all_gather`` and ``reduce_scatter`` over lists of unequal tensors,
    which NCCL takes and gloo refuses ("invalid tensor size"): the all-to-all dispatcher
    gathers and scatters the tokens of expert tensor parallelism with per-rank counts
    (``tensor_parallel/mappings.py:150`` and ``:192``, from
    ``transformer/moe/token_dispatcher.py:696``). Lists of equal tensors go to gloo as
    before."""
    all_gather, reduce_scatter = torch.distributed.all_gather, torch.distributed.reduce_scatter

    def uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or len({part.shape for part in tensor_list}) == 1:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(part.shape[0] for part in tensor_list)
        padded = [tensor.new_empty((longest, *tensor.shape[1:])) for _ in tensor_list]
        all_gather(padded, torch.cat([tensor, tensor.new_zeros(
            (longest - tensor.shape[0], *tensor.shape[1:]))]), group=group)
        for part, received in zip(tensor_list, padded):
            part.copy_(received[:part.shape[0]])
        return None

    def uneven_reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM,
                              group=None, async_op=False):
        if async_op or len({part.shape for part in input_list}) == 1:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        everything = torch.cat(input_list)
        torch.distributed.all_reduce(everything, op=op, group=group)
        rank = torch.distributed.get_rank(group)
        output.copy_(everything.split([part.shape[0] for part in input_list])[rank])
        return None

    torch.distributed.all_gather = uneven_all_gather
    torch.distributed.reduce_scatter = uneven_reduce_scatter


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for tensors that are already on the CPU: the
    original copies (and turns into numpy) only tensors that are ``is_cuda`` (line 1093), and
    the all-to-all dispatcher hands its splits, which gloo wants as a list of ints, to
    ``all_to_all_single`` as numpy (``transformer/moe/token_dispatcher.py:879-887``)."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _is_present(tensor) -> None:
    assert tensor is not None


def flush_denormals_on_every_thread() -> None:
    """Treat denormal floats as zero (FTZ/DAZ) in this thread and in torch's OpenMP threads.

    The flag is per thread and ``torch.set_flush_denormal`` sets only the caller's, so it is
    also run once in a parallel region of the OpenMP runtime torch ships (``torch/lib``),
    whose pool then computes torch's parallel ops. Without that runtime (another OpenMP, or
    none) only this thread is set. Values below 1.2e-38 (fp32) never matter for training;
    a torch.set_num_threads raised later starts threads without the flag (slower, not wrong).
    """
    torch.set_flush_denormal(True)
    runtimes = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if not runtimes:
        return
    body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))
    ctypes.CDLL(str(runtimes[0])).GOMP_parallel(
        body, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
_NEVER_TRIM = -1  # mallopt(3): -1 disables trimming


def keep_freed_memory_in_heap() -> None:
    """Serve every allocation from the heap and keep what is freed there (glibc's mallopt).

    Training allocates and frees the same large activations step after step; through ``mmap``
    each one costs a page fault per 4 KiB on every use. The heap instead reuses them, at the
    price of the process keeping its peak memory. Other C libraries are left as they are.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)


def _check_megatron_version() -> None:
    found = importlib.metadata.version("megatron-core")
    if found != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"the cpu backend is written for megatron-core=={MEGATRON_CORE_VERSION}, found "
            f"{found}: pip install megatron-core=={MEGATRON_CORE_VERSION}"
        )


# Fallbacks that are the cpu backend's design, announced by Megatron-Core at import/build.
_EXPECTED_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
)


def install() -> None:
    """Make Megatron-Core run on the CPU. Idempotent; call before importing Megatron-Core.

    Strict (:class:`StrictCpuError`) when ``MEGATRON_HYBRID_STRICT_CPU=1`` is set."""
    global _redirect, _strict
    if _redirect is not None:
        return
    _strict = os.environ.get(STRICT_ENVIRONMENT_VARIABLE) == "1"
    _check_megatron_version()
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    kernels.register()
    flush_denormals_on_every_thread()
    keep_freed_memory_in_heap()
    _patch_torch_cuda()
    _redirect = _CudaDeviceRedirect()
    _redirect.__enter__()  # stays on the mode stack for the life of the process
    _patch_megatron_rng()
    _patch_megatron_dynamic_inference()
    _patch_megatron_moe()


@contextlib.contextmanager
def cuda_device_is(device: str | torch.device):
    """Temporarily send Megatron-Core's ``cuda`` tensors to ``device`` (e.g. ``meta``)."""
    if _redirect is None:
        raise RuntimeError("the cpu backend is not installed")
    previous, _redirect.target = _redirect.target, torch.device(device)
    try:
        yield
    finally:
        _redirect.target = previous


@contextlib.contextmanager
def gloo_accepts_scalar_all_gather():
    """Within: ``torch.distributed.all_gather_into_tensor`` takes a 0-d input as shape (1,)
    (the layout gloo expects; NCCL accepts both)."""
    original = torch.distributed.all_gather_into_tensor

    def all_gather_into_tensor(output, input, *args, **kwargs):
        return original(output, input.reshape(1) if input.dim() == 0 else input, *args, **kwargs)

    torch.distributed.all_gather_into_tensor = all_gather_into_tensor
    try:
        yield
    finally:
        torch.distributed.all_gather_into_tensor = original
