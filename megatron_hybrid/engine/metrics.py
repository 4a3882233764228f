"""Training metrics that mean something: model FLOPs counted from the pattern's layer kinds,
the detected device's peak, and per-interval loss, throughput, MFU and memory.

A training loop uses it like this (only the logging rank writes; nothing here calls
``torch.distributed``)::

    flops = flops_per_token(cfg, seq_length)["total"]
    device_name, peak = device_peak_flops(torch.bfloat16)
    with MetricsTracker(run_dir, is_logging_rank=rank == 0, flops_per_token=flops,
                        peak_flops=peak, world_size=world_size, total_steps=steps) as tracker:
        for step in range(1, steps + 1):
            ...
            tracker.step(step, loss=loss, grad_norm=norm, lr=lr, tokens=gbs * seq, seconds=dt)
        tracker.log_eval(step, eval_loss)
    plot_loss_curve(tracker.history_path, run_dir / "loss.png")

FLOP conventions (the model FLOPs of MFU, PaLM arXiv 2204.02311 appendix B):

- A matmul of (m x k) by (k x n) is ``2*m*k*n`` FLOPs. Elementwise work (norms, activations,
  gates, softplus/exp of the SSD decays, residual adds) is not counted, as in Megatron-LM.
- Training is 3x forward: backward runs every GEMM twice, for data and weight gradients
  (Narayanan et al., arXiv 2104.04473, appendix). Activation recomputation is not counted:
  this is MFU, not hardware FLOPs utilisation.
- Causal masks count half: attention's QK^T and AV and the SSD's masked intra-chunk matmuls
  count the lower triangle only (on average L/2 keys per query), which is the work a causal
  kernel needs. Megatron's hybrid formula does the same (``attn_layer_flops``: ``seq_len / 2``
  in Megatron-LM / Megatron-Bridge ``hybrid_flops``), so MFU here compares with Megatron's
  published hybrid MFU; Megatron-LM's older GPT formula, PaLM and torch's FlopCounterMode count
  the full square (2x our attention core).

One module because the FLOP counts, the device peaks and the tracker that divides one by
the other are one formula read three ways; the plots are its outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from megatron_hybrid import backends
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.model.hf_mapping import MEGATRON_CONV_KERNEL
from megatron_hybrid.model.params import KIND_KEYS

TRAINING_FLOPS_FACTOR = 3
"""Forward + backward (data and weight gradients) per GEMM."""


# ---------------------------------------------------------------------------------------------
# FLOPs per token, from the pattern's layer kinds
# ---------------------------------------------------------------------------------------------

def flops_per_token(cfg: ModelConfig, seq_length: int, *, training: bool = True) -> dict:
    """Model FLOPs per token of a ``seq_length``-token sequence, per layer kind and in total.

    Returns ``mamba``, ``attention``, ``mlp``, ``moe``, ``parallel_heads`` (each summed over
    that kind's layers of the pattern; 0 when absent), ``logits`` and ``total``; ``training``
    multiplies every entry by 3 (forward + backward). The embedding lookup costs no FLOPs.
    """
    counts = cfg.layer_pattern.counts
    per_layer = {
        "mamba": mamba_layer_flops(cfg, seq_length),
        "attention": attention_layer_flops(cfg, seq_length),
        "mlp": mlp_layer_flops(cfg),
        "moe": moe_layer_flops(cfg) if counts["E"] else 0,  # experts may be unset without E
        "parallel_heads": parallel_heads_layer_flops(cfg, seq_length),
    }
    flops = {key: counts[symbol] * per_layer[key] for symbol, key in KIND_KEYS.items()}
    flops["logits"] = logits_flops(cfg)
    factor = TRAINING_FLOPS_FACTOR if training else 1
    flops = {key: factor * value for key, value in flops.items()}
    flops["total"] = sum(flops.values())
    return flops


def mlp_layer_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one MLP layer: fc1 ``2*h*f`` + fc2 ``2*f*h`` = ``4*h*f``
    (squared ReLU, no gating, so no third GEMM as in SwiGLU)."""
    return 4 * cfg.hidden_size * cfg.ffn_hidden_size


def attention_layer_flops(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of one attention layer, causal half of the core counted:

    fused QKV ``2*h*d*(a + 2*g)`` + out proj ``2*a*d*h`` + QK^T and AV ``2 * 2*a*d*(L/2)``
    (h hidden, a query heads, g KV groups, d head dim, L sequence length). Linear in L.
    """
    h, a, g, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    projections = 2 * h * d * (a + 2 * g) + 2 * a * d * h
    return projections + 2 * a * d * seq_length


def mamba_layer_flops(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of one Mamba-2 layer: projections, conv and the SSD scan.

    in_proj ``2*h*(2*H*P + 2*G*N + H)`` (z, x, B, C, dt), depthwise conv ``2*K*(H*P + 2*G*N)``
    over x, B, C, out_proj ``2*H*P*h``, plus :func:`ssd_scan_flops` (H heads of dim P, G groups,
    state N, conv kernel K). Constant in L except through the chunking of the scan.
    """
    h, d_inner = cfg.hidden_size, cfg.mamba_d_inner
    bc = 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
    in_proj = 2 * h * (2 * d_inner + bc + cfg.mamba_num_heads)
    conv = 2 * MEGATRON_CONV_KERNEL * (d_inner + bc)
    out_proj = 2 * d_inner * h
    return in_proj + conv + ssd_scan_flops(cfg, seq_length) + out_proj


def parallel_heads_layer_flops(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of one parallel-heads (``H``) layer: an attention layer's (over
    about ``2 * attention_window`` positions when windowed: each query sees ``window`` keys,
    not ``L/2`` on average) and a Mamba-2 layer's, less one output projection (the branches
    share one of width ``a*d``)."""
    window = cfg.attention_window
    attention = attention_layer_flops(cfg, min(seq_length, 2 * window) if window else seq_length)
    shared_projection = 2 * cfg.num_attention_heads * cfg.kv_channels * cfg.hidden_size
    return attention + mamba_layer_flops(cfg, seq_length) - shared_projection


def ssd_scan_flops(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of the chunked SSD scan (Dao & Gu, arXiv 2405.21060, sec. 6).

    Per sequence split into chunks of at most Q tokens (lengths l_c, n_c chunks):

    - diagonal blocks, causal half: ``C B^T`` per group ``N*l_c^2`` and ``(L o CB) X`` per head
      ``P*l_c^2``, i.e. ``(G*N + H*P) * sum(l_c^2)`` -- the intra-chunk quadratic part;
    - chunk states ``B^T X`` and state-to-output ``C h``: ``2 * 2*H*P*N * L``;
    - state passing between chunks (decay, add): ``2*H*P*N * n_c``.

    Divided by L: ``(G*N + H*P)*Q + 4*H*P*N + 2*H*P*N/Q`` when Q divides L.
    """
    heads_p = cfg.mamba_num_heads * cfg.mamba_head_dim
    n, q, length = cfg.mamba_state_dim, cfg.mamba_chunk_size, seq_length
    full_chunks, rest = divmod(length, q)
    squares = full_chunks * q * q + rest * rest
    chunks = full_chunks + (rest > 0)
    intra_chunk = (cfg.mamba_num_groups * n + heads_p) * squares
    states_and_output = 4 * heads_p * n * length
    state_passing = 2 * heads_p * n * chunks
    return (intra_chunk + states_and_output + state_passing) / length


def moe_layer_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one MoE layer (the active experts only): router ``2*h*E``
    + top-k experts, each a squared-ReLU MLP of width ``moe_ffn_hidden_size``
    (``ffn_hidden_size`` when unset), + the shared expert of width
    ``moe_shared_expert_intermediate_size`` when there is one."""
    if not cfg.num_moe_experts:
        raise ValueError("model.num_moe_experts must be set to count the FLOPs of 'E' layers")
    expert_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    router = 2 * cfg.hidden_size * cfg.num_moe_experts
    active_ffn = cfg.moe_router_topk * expert_ffn + (cfg.moe_shared_expert_intermediate_size or 0)
    return router + 4 * cfg.hidden_size * active_ffn


def logits_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of the output layer: ``2*h*V``."""
    return 2 * cfg.hidden_size * cfg.vocab_size


# ---------------------------------------------------------------------------------------------
# Device peak
# ---------------------------------------------------------------------------------------------

GPU_PEAK_TFLOPS = (
    # (name pattern, {dtype: dense TFLOP/s}) from NVIDIA's datasheets, without 2:4 sparsity.
    # Most specific first: "H100 NVL" before "H100". A dtype the GPU lacks (fp8 before Hopper
    # and Ada; fp32/TF32 everywhere, not tabulated) is missing, so its MFU reads n/a.
    (r"\bGB200\b", {"bf16": 2500, "fp8": 5000}),
    (r"\bB200\b", {"bf16": 2250, "fp8": 4500}),
    (r"\bH200 NVL\b", {"bf16": 835, "fp8": 1671}),
    (r"\bGH200\b", {"bf16": 989, "fp8": 1979}),
    (r"\bH200\b", {"bf16": 989, "fp8": 1979}),
    (r"\bH100 NVL\b", {"bf16": 835, "fp8": 1671}),
    (r"\bH100 PCIe\b", {"bf16": 756, "fp8": 1513}),
    (r"\bH100\b", {"bf16": 989, "fp8": 1979}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", {"bf16": 312}),
    (r"\bL40S\b", {"bf16": 362, "fp8": 733}),
    (r"\bL40\b", {"bf16": 181, "fp8": 362}),
    (r"\bL4\b", {"bf16": 121, "fp8": 242}),
    # The A10G (AWS) has no datasheet of its own; NVIDIA's A10 figure is the one published.
    (r"\bA10G?\b", {"bf16": 125}),
)
"""Dense tensor-core peaks by ``torch.cuda.get_device_name()``; fp16 uses the bf16 column."""

_DTYPE_KEYS = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16",
    torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8",
    "fp32": "fp32", "bf16": "bf16", "fp16": "bf16", "fp8": "fp8",
}
_CPU_PROBE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_peak_flops(dtype: torch.dtype | str = torch.float32) -> tuple[str, float | None]:
    """``(device name, peak FLOP/s)`` of this process's device for matmuls in ``dtype``.

    A GPU is looked up in :data:`GPU_PEAK_TFLOPS`; one not listed (or a dtype it lacks, fp32
    included) gives None, so MFU is reported as n/a rather than against a guessed peak.
    On the CPU the peak is measured now, by :func:`measure_matmul_flops` (the best of its
    trials), and nothing is stored: a probe taken while other processes load the CPU reads
    low and would inflate every later MFU. Processes on one machine probe one at a time.
    """
    key = _dtype_key(dtype)
    if backends.active() == "cuda":
        name = torch.cuda.get_device_name(backends.device())
        return name, gpu_peak_flops(name, key)
    name = cpu_device_name()
    if key not in _CPU_PROBE_DTYPES:
        return name, None
    with _probe_lock():
        return name, measure_matmul_flops(dtype=_CPU_PROBE_DTYPES[key])


def gpu_peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of a GPU by its CUDA name, or None when not in the table."""
    key = _dtype_key(dtype)
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[key] * 1e12 if key in peaks else None
    return None


def measure_matmul_flops(size: int = 1024, dtype: torch.dtype = torch.float32,
                         seconds: float = 0.5, trials: int = 5) -> float:
    """Best FLOP/s of ``size``-square matmuls on the CPU over ``trials`` timed runs taking
    ``seconds`` in all (best, not mean: the peak is what the hardware can do)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    torch.mm(a, b)  # warm-up, and the time of one matmul to size the trials
    per_trial = max(1, int(seconds / trials / (time.perf_counter() - start)))
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(per_trial):
            torch.mm(a, b)
        best = max(best, 2 * size**3 * per_trial / (time.perf_counter() - start))
    return best


class PeakProbes:
    """Matmul probes taken during one run, alongside its work; the peak is the best of them.

    A probe taken while other processes load the CPU reads low, and MFU against it reads
    high; the best of several probes spread over the run is the nearest to what the cores
    can do at that run's time. Each probe records when it was taken (``time``) and the
    caller's marks (e.g. the step it followed).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, seconds: float = 0.5):
        self.dtype, self.seconds = dtype, seconds
        self.probes: list[dict] = []

    def probe(self, **marks) -> float:
        with _probe_lock():
            flops = measure_matmul_flops(dtype=self.dtype, seconds=self.seconds)
        self.probes.append({**marks, "time": time.time(), "flops": flops})
        return flops

    def best(self) -> dict:
        """The probe with the highest FLOP/s (its marks, time and flops)."""
        if not self.probes:
            raise RuntimeError("no peak probe taken yet: call probe() first")
        return max(self.probes, key=lambda probe: probe["flops"])


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_device_name() -> str:
    """The CPU's model name and this process's torch thread count: a CPU peak is per both."""
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def _dtype_key(dtype: torch.dtype | str) -> str:
    if dtype not in _DTYPE_KEYS:
        raise ValueError(f"unsupported dtype {dtype!r}: use fp32, bf16, fp16 or fp8")
    return _DTYPE_KEYS[dtype]


@contextlib.contextmanager
def _probe_lock():
    """One probe at a time on this machine: ranks probing together on the same cores would
    each read a fraction of the peak."""
    import fcntl

    path = Path(tempfile.gettempdir()) / f"megatron_hybrid_peak_probe.{os.getuid()}.lock"
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: CUDA ``max_memory_allocated`` once this process has used CUDA,
    else the process's peak resident set size (``getrusage`` ``ru_maxrss``)."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated(), "cuda max allocated"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak RSS"  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Per-interval metrics
# ---------------------------------------------------------------------------------------------

class MetricsTracker:
    """Aggregates training steps into one record per log interval and writes it out.

    Each record goes to ``metrics.jsonl`` in ``run_dir`` (train and eval, one JSON object a
    line), to TensorBoard (``run_dir/tensorboard``) when ``tensorboard`` is set, and to the
    terminal: a tqdm bar when ``progress`` is "on" (or "auto" and the stream is a terminal),
    else one plain line per interval. Only the logging rank does any of this; on other ranks
    every call returns None at once.

    Loss and grad norm are averaged over the interval; tokens/s is the interval's tokens over
    its summed step times; TFLOP/s and MFU are per device (``world_size`` devices share the
    model FLOPs of every token).
    """

    def __init__(self, run_dir: str | Path, *, is_logging_rank: bool,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 world_size: int = 1, total_steps: int | None = None, log_interval: int = 10,
                 progress: str = "auto", tensorboard: bool = False, tokens_seen: int = 0,
                 stream=None):
        if progress not in ("auto", "on", "off"):
            raise ValueError(f"progress must be 'auto', 'on' or 'off', got {progress!r}")
        self.history_path = Path(run_dir) / "metrics.jsonl"
        self.enabled = is_logging_rank
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.world_size, self.total_steps, self.log_interval = world_size, total_steps, log_interval
        self.tokens_seen = tokens_seen
        self._stream = stream or sys.stdout
        self._use_bar = progress == "on" or (progress == "auto" and self._stream.isatty())
        self._bar = self._writer = self._history = None
        self._reset_interval()
        if self.enabled:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            self._history = open(self.history_path, "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def is_log_step(self, step: int) -> bool:
        """Whether ``step`` ends a log interval (the same answer on every rank)."""
        return step % self.log_interval == 0 or step == self.total_steps

    def step(self, step: int, *, loss, grad_norm, lr: float, tokens: int,
             seconds: float, extra: dict | None = None) -> dict | None:
        """Record one optimizer step (``tokens``: global tokens of the step, all data-parallel
        ranks); returns the interval's record at a log step, else None. ``loss`` and
        ``grad_norm`` may be tensors: they are summed as given and read once per interval,
        so logging adds no device sync per step. ``extra`` adds fields to a log step's
        record (e.g. the expert load)."""
        if not self.enabled:
            return None
        self._loss_sum += loss
        self._grad_sum += grad_norm
        self._steps += 1
        self._tokens += tokens
        self._seconds += seconds
        self.tokens_seen += tokens
        self._advance_bar(step)
        if not self.is_log_step(step):
            return None
        record = {**self._interval_record(step, lr), **(extra or {})}
        self._reset_interval()
        self._emit(record, _train_line(record, self.total_steps, self.world_size))
        return record

    def log_eval(self, step: int, loss: float) -> dict | None:
        """Record an evaluation loss at ``step``; returns the record (None off the logging rank)."""
        if not self.enabled:
            return None
        record = {"kind": "eval", "step": step, "loss": float(loss),
                  "tokens": self.tokens_seen, "time": time.time()}
        self._emit(record, f"eval step {step} | loss {record['loss']:.4f}")
        return record

    def close(self) -> None:
        for handle in (self._bar, self._writer, self._history):
            if handle is not None:
                handle.close()
        self._bar = self._writer = self._history = None

    def __enter__(self) -> MetricsTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reset_interval(self) -> None:
        self._loss_sum = self._grad_sum = 0.0
        self._steps = self._tokens = 0
        self._seconds = 0.0

    def _interval_record(self, step: int, lr: float) -> dict:
        tokens_per_s = self._tokens / self._seconds if self._seconds > 0 else None
        per_device = tokens_per_s / self.world_size if tokens_per_s is not None else None
        flops_per_s = (per_device * self.flops_per_token
                       if per_device is not None and self.flops_per_token else None)
        memory, memory_source = peak_memory()
        return {
            "kind": "train", "step": step,
            "loss": float(self._loss_sum) / self._steps,
            "grad_norm": float(self._grad_sum) / self._steps,
            "lr": float(lr), "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
            "tflops_per_device": flops_per_s / 1e12 if flops_per_s is not None else None,
            "mfu": flops_per_s / self.peak_flops if flops_per_s and self.peak_flops else None,
            "peak_memory_bytes": memory, "memory_source": memory_source,
            "time": time.time(),
        }

    def _emit(self, record: dict, line: str) -> None:
        self._history.write(json.dumps(record) + "\n")
        self._history.flush()  # a crashed run keeps its history
        if self._writer is not None:
            _write_scalars(self._writer, record)
        if self._bar is not None and record["kind"] == "train":
            self._bar.set_postfix_str(_bar_postfix(record), refresh=True)
        elif self._bar is not None:
            self._bar.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)

    def _advance_bar(self, step: int) -> None:
        if not self._use_bar:
            return
        if self._bar is None:
            from tqdm import tqdm

            # Starts at the first step seen, so a resumed run's rate is not skewed.
            self._bar = tqdm(total=self.total_steps, initial=step - 1, file=self._stream,
                             unit="step", dynamic_ncols=True)
        self._bar.update(step - self._bar.n)


_TENSORBOARD_TAGS = {
    ("train", "loss"): "train/loss", ("train", "grad_norm"): "train/grad_norm",
    ("train", "lr"): "train/lr", ("train", "tokens_per_s"): "perf/tokens_per_s",
    ("train", "tokens_per_s_per_device"): "perf/tokens_per_s_per_device",
    ("train", "tflops_per_device"): "perf/tflops_per_device", ("train", "mfu"): "perf/mfu",
    ("train", "peak_memory_bytes"): "memory/peak_bytes", ("eval", "loss"): "eval/loss",
    ("train", "expert_load_max_over_mean"): "moe/expert_load_max_over_mean",
    ("train", "expert_load_cv"): "moe/expert_load_cv",
    ("train", "reward"): "rl/reward", ("train", "kl"): "rl/kl",
    ("train", "response_length"): "rl/response_length",
}


def _write_scalars(writer, record: dict) -> None:
    for (kind, field), tag in _TENSORBOARD_TAGS.items():
        if record["kind"] == kind and record.get(field) is not None:
            writer.add_scalar(tag, record[field], global_step=record["step"])
    writer.flush()


def _train_line(record: dict, total_steps: int | None, world_size: int) -> str:
    """``step 50/300 | loss 4.123 | grad 0.91 | lr 3.0e-03 | 12.3k tok/s | 1.2 TFLOP/s |
    MFU 2.1% | mem 1.1 GiB (peak RSS)``; with several devices tok/s adds the per-device
    rate and TFLOP/s reads TFLOP/s/dev."""
    step = f"step {record['step']}" + (f"/{total_steps}" if total_steps else "")
    parts = [step, f"loss {record['loss']:.4f}", f"grad {record['grad_norm']:.3g}",
             f"lr {record['lr']:.1e}"]
    if record["tokens_per_s"] is not None:
        rate = f"{format_si(record['tokens_per_s'])} tok/s"
        if world_size > 1:
            rate += f" ({format_si(record['tokens_per_s_per_device'])}/dev)"
        parts.append(rate)
    if record["tflops_per_device"] is not None:
        unit = "TFLOP/s/dev" if world_size > 1 else "TFLOP/s"
        parts.append(f"{record['tflops_per_device']:.3g} {unit}")
    parts.append(f"MFU {record['mfu']:.1%}" if record["mfu"] is not None else "MFU n/a")
    parts.append(f"mem {record['peak_memory_bytes'] / 2**30:.1f} GiB ({record['memory_source']})")
    if "expert_load_max_over_mean" in record:
        parts.append(f"expert load max/mean {record['expert_load_max_over_mean']:.2f}")
    return " | ".join(parts)


def _bar_postfix(record: dict) -> str:
    rate = record["tokens_per_s"]
    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a"
    return (f"loss {record['loss']:.4f} | {format_si(rate) if rate else '-'} tok/s | "
            f"MFU {mfu}")


def format_si(value: float) -> str:
    """3 significant digits with a k/M/G/T suffix: 950, 12.3k, 1.2M."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)
# ---------------------------------------------------------------------------------------------

FIGSIZE, DPI = (8, 4.5), 120
"""960 x 540 pixel PNGs."""


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], out_png: str | Path, *,
                title: str | None = None, xlabel: str = "step", ylabel: str = "loss",
                log_y: bool = False) -> Path:
    """One line per label of ``{label: [(x, y), ...]}`` on shared axes, saved as a PNG."""
    fig, ax = _new_axes(title, xlabel, ylabel)
    for label, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, label=label, linewidth=1.5)
    if log_y:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    return _save(fig, out_png)


def plot_loss_curve(history_jsonl_path: str | Path, out_png: str | Path, *,
                    title: str = "Training loss") -> Path:
    """Train loss (line) and eval loss (markers) of a ``metrics.jsonl`` history vs step, with
    the tokens seen on a second x-axis along the top. A step logged twice (a resumed run
    appends to the history) is drawn once, from its latest record."""
    records = [json.loads(line) for line in Path(history_jsonl_path).read_text().splitlines()
               if line.strip()]
    train, evals = (_latest_per_step(records, kind) for kind in ("train", "eval"))
    tokens = max((r["tokens"] for r in records), default=0)
    fig, ax = _new_axes(f"{title} ({format_si(tokens)} tokens)", "step", "loss")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1.5)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o", label="eval")
    ax.legend()
    if len(train) >= 2:  # the step <-> tokens map needs two points to be invertible
        _add_tokens_axis(ax, [r["step"] for r in train], [r["tokens"] for r in train])
    return _save(fig, out_png)


def _latest_per_step(records: list[dict], kind: str) -> list[dict]:
    latest = {r["step"]: r for r in records if r["kind"] == kind}
    return [latest[step] for step in sorted(latest)]


def _add_tokens_axis(ax, steps: list[int], tokens: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter

    top = ax.secondary_xaxis("top", functions=(_piecewise_linear(steps, tokens),
                                               _piecewise_linear(tokens, steps)))
    top.set_xlabel("tokens")
    top.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_si(value)))


def _piecewise_linear(xs: list[float], ys: list[float]):
    """Interpolation through the points, extended along the end segments (np.interp alone
    clamps, which piles the secondary axis's ticks up at the plot's margins)."""
    import numpy as np

    def mapping(values):
        values = np.asarray(values, dtype=float)
        left = ys[0] + (values - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
        right = ys[-1] + (values - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        inside = np.interp(values, xs, ys)
        return np.where(values < xs[0], left, np.where(values > xs[-1], right, inside))

    return mapping


def _new_axes(title: str | None, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out
