"""``megatron-hybrid bench``: our training step against HF NemotronH's torch reference path.

Both sides train the same model (pattern, widths, vocabulary; fp32) from the same weights on
the same token batches with the same AdamW settings and gradient clipping:

- **ours**: Megatron-Core's ``MambaModel`` on the cpu backend, stepped by ``engine.train_step``
  (DDP buffers, the schedule, Megatron's optimizer) exactly as ``megatron-hybrid train`` does;
- **HF**: transformers' ``NemotronHForCausalLM`` on its torch reference path (no
  ``mamba_ssm`` / ``causal_conv1d`` kernels), stepped by a plain loop (forward,
  cross-entropy, backward, ``clip_grad_norm_``, ``torch.optim.AdamW``).

What differs is the code path and nothing else: both processes get the cpu backend's process
settings (denormals flushed on every thread, freed memory kept in glibc's heap), the same
torch thread count and the same AdamW implementation (``--adamw``, fused by default). Each
side reads its settings back from the live process (a denormal multiplied on every thread,
a large allocation's origin, the optimizers' param-group flags) and the report shows both;
``--peer-without`` withholds a process setting from the HF side, for the ablation in
docs/performance.md.

Each side runs in its own spawned process: HF's process never installs the cpu backend, so
``mamba_ssm`` / ``causal_conv1d`` cannot be imported there and transformers binds its torch
kernels (checked at start), and each side's peak resident memory is its own. The parent
alternates steps (ours, HF, HF, ours, ...: ABBA rounds cancel drift), so both see the same
machine load, and reports medians over the timed steps. The losses of the two sides are
compared step by step against :data:`LOSS_TOLERANCE`.

FLOPs per token come from :func:`metrics.flops_per_token`. MFU is against the fp32 matmul
peak of this run: the parent probes the matmul throughput before the first step and after
every round while both sides wait, and takes the best probe (:class:`metrics.PeakProbes`).

One module because the two sides (ours and HF's) must be built, stepped and timed by
the same code, with the same settings, to make the ratio fair.
"""

from __future__ import annotations

import ctypes
import dataclasses
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.model.config import ModelConfig

if TYPE_CHECKING:
    from megatron_hybrid.engine import metrics


DEFAULT_MODEL = ModelConfig(
    pattern="M-M*M-M-", hidden_size=512, ffn_hidden_size=2048,
    num_attention_heads=8, num_query_groups=2, kv_channels=64,
    mamba_num_heads=16, mamba_head_dim=64, mamba_state_dim=128, mamba_num_groups=2,
    vocab_size=8192, seq_length=1024, mamba_chunk_size=128,
)
"""A 22.7M-parameter hybrid (4 Mamba, 1 attention, 3 MLP layers) at sequence length 1024."""
SHAPE_FIELDS = ("pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "mamba_num_heads", "mamba_head_dim",
                "mamba_state_dim", "mamba_num_groups", "vocab_size", "seq_length",
                "mamba_chunk_size")
"""ModelConfig fields settable from the command line (``--hidden-size 256``)."""
TARGET_RATIO = 1.5
"""Our tokens/s over HF's on the default config."""
TARGET_MFU = 0.6
"""Our model FLOP/s over this run's best fp32 matmul probe on the default config."""
LOSS_TOLERANCE = 4e-4
"""Largest step loss difference between the sides that still means one model: ten times the
largest gap measured across machines (2e-6 on one, 4.2e-5 on another, default config)."""
SIDES = ("ours", "hf")
LABELS = {"ours": "ours (Megatron-Core)", "hf": "HF NemotronH torch reference path"}
ADAMW_IMPLEMENTATIONS = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "for-loop": {"fused": False, "foreach": False},
}
"""torch AdamW's implementations by name, as its param-group flags."""
PROCESS_SETTINGS = ("flush_denormal", "heap_retention")
"""The cpu backend's process settings, which both sides get (``--peer-without`` aside)."""
EQUAL_SETTINGS = ("threads", *PROCESS_SETTINGS, "optimizer")
"""Settings both sides must share for a fair ratio; ``kernels`` (the code path) differs."""


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    model: ModelConfig
    batch_size: int = 2
    """Sequences per step (one micro-batch)."""
    warmup: int = 2
    """Untimed steps per side before the timed ones."""
    steps: int = 6
    """Timed steps per side."""
    threads: int = 0
    """torch intra-op threads in each side's process (0: torch's default)."""
    adamw: str = "fused"
    """torch AdamW implementation of both sides: a key of :data:`ADAMW_IMPLEMENTATIONS`."""
    peer_without: tuple[str, ...] = ()
    """Process settings (of :data:`PROCESS_SETTINGS`) withheld from the HF side: ablation."""
    seed: int = 1234

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.seq_length


# ---------------------------------------------------------------------------------------------
# The parent: start both sides, alternate their steps, summarise
# ---------------------------------------------------------------------------------------------

def benchmark(settings: BenchSettings, progress=None) -> dict:
    """Run the benchmark and return its results (see :func:`format_report` for the fields)."""
    import torch

    from megatron_hybrid.engine import metrics

    threads = settings.threads or torch.get_num_threads()
    settings = dataclasses.replace(settings, threads=threads)
    torch.set_num_threads(threads)  # the peak probes run at the workers' thread count
    peaks = metrics.PeakProbes(torch.float32)
    with tempfile.TemporaryDirectory(prefix="megatron-hybrid-bench-") as tmp:
        weights = Path(tmp) / "hf_weights.pt"
        # The ours side writes the weights HF starts from.
        with WorkerProcess("ours", TrainingSide, "ours", settings, weights) as ours:
            with WorkerProcess("hf", TrainingSide, "hf", settings, weights,
                               ours.started["optimizer"]) as hf:
                sides = {"ours": ours, "hf": hf}
                runs = _alternate(sides, settings, peaks, progress)
                for side, process in sides.items():
                    runs[side].update(process.call("report"),
                                      parameters=process.started["parameters"])
    flops = metrics.flops_per_token(settings.model, settings.model.seq_length)["total"]
    return summarise(settings, runs, peaks, flops, metrics.cpu_device_name())


def _alternate(sides: dict, settings: BenchSettings, peaks, progress) -> dict:
    """Step both sides in ABBA order, probing the matmul peak before the first round and
    after each; per side, every step's loss and seconds (warm-up too)."""
    runs = {side: {"losses": [], "seconds": []} for side in SIDES}
    total = settings.warmup + settings.steps
    peaks.probe(after_step=None)
    for step in range(total):
        for side in SIDES if step % 2 == 0 else SIDES[::-1]:
            loss, elapsed = sides[side].call("step", step)
            runs[side]["losses"].append(loss)
            runs[side]["seconds"].append(elapsed)
        peaks.probe(after_step=step)
        if progress is not None:
            kind = "warm-up" if step < settings.warmup else "timed"
            print(f"  step {step + 1}/{total} ({kind}): " + ", ".join(
                f"{side} {runs[side]['seconds'][-1]:.2f} s loss {runs[side]['losses'][-1]:.4f}"
                for side in SIDES) + f", peak probe {peaks.probes[-1]['flops'] / 1e9:.0f} "
                "GFLOP/s", file=progress, flush=True)
    return runs


def summarise(settings: BenchSettings, runs: dict, peaks: metrics.PeakProbes,
              flops_per_token: float, device: str) -> dict:
    """The results as a JSON-ready dict; medians over the timed steps. ``runs`` holds per
    side its parameter count, every step's loss and seconds, peak RSS bytes and settings;
    ``peaks`` the run's matmul probes (``after_step``, ``time``, ``flops``); MFU is against
    their best."""
    peak = peaks.best()
    per_side = {}
    for side in SIDES:
        timed = runs[side]["seconds"][settings.warmup:]
        median = statistics.median(timed)
        tokens_per_s = settings.tokens_per_step / median
        flops_per_s = flops_per_token * tokens_per_s
        per_side[side] = {
            "step_seconds_median": median, "step_seconds": timed,
            "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
            "mfu": flops_per_s / peak["flops"], "peak_rss_bytes": runs[side]["memory"],
            "losses": runs[side]["losses"], "parameters": runs[side]["parameters"],
            "settings": runs[side]["settings"],
        }
    ratio = per_side["ours"]["tokens_per_s"] / per_side["hf"]["tokens_per_s"]
    loss_diff = max(abs(a - b) for a, b in zip(runs["ours"]["losses"], runs["hf"]["losses"]))
    unequal = settings_unequal(per_side["ours"]["settings"], per_side["hf"]["settings"],
                               EQUAL_SETTINGS)
    return {
        "model": settings.model.to_dict(), "parameters": per_side["ours"]["parameters"],
        "batch_size": settings.batch_size, "seq_length": settings.model.seq_length,
        "tokens_per_step": settings.tokens_per_step, "warmup": settings.warmup,
        "steps": settings.steps, "threads": settings.threads, "adamw": settings.adamw,
        "peer_without": list(settings.peer_without), "device": device,
        "peak_flops": peak["flops"], "peak_probe": peak, "peak_probes": peaks.probes,
        "flops_per_token": flops_per_token,
        "ours": per_side["ours"], "hf": per_side["hf"], "ratio": ratio,
        "settings_unequal": unequal,
        "loss_max_abs_diff": loss_diff, "loss_tolerance": LOSS_TOLERANCE,
        "losses_agree": loss_diff <= LOSS_TOLERANCE,
        "targets": {"ratio": TARGET_RATIO, "mfu": TARGET_MFU},
        "meets_targets": {"ratio": ratio >= TARGET_RATIO,
                          "mfu": per_side["ours"]["mfu"] >= TARGET_MFU},
    }


def format_report(result: dict) -> str:
    model = result["model"]
    lines = [
        f"bench: pattern {model['pattern']}, hidden {model['hidden_size']}, "
        f"{result['parameters'] / 1e6:.1f}M parameters, seq {result['seq_length']} x batch "
        f"{result['batch_size']}, fp32, {result['threads']} threads",
        f"  {result['warmup']} warm-up + {result['steps']} timed steps per side, alternating; "
        "medians",
        f"  {'':<34}{'tokens/s':>10}{'s/step':>9}{'GFLOP/s':>10}{'MFU':>8}{'peak RSS':>11}",
    ]
    for side in SIDES:
        r = result[side]
        lines.append(f"  {LABELS[side]:<34}{r['tokens_per_s']:>10.0f}"
                     f"{r['step_seconds_median']:>9.3f}{r['flops_per_s'] / 1e9:>10.1f}"
                     f"{r['mfu']:>8.1%}{r['peak_rss_bytes'] / 2**30:>7.2f} GiB")
    for side in SIDES:
        lines.append(f"  {side} settings: " + ", ".join(
            f"{key} {result[side]['settings'][key]}" for key in (*EQUAL_SETTINGS, "kernels")))
    unequal = result["settings_unequal"]
    peak = result["peak_probe"]
    verdict = {True: "met", False: "not met"}
    lines += [
        "  settings: " + (f"UNEQUAL ({', '.join(unequal)})" if unequal else "equal on both sides"),
        f"  ratio ours/HF: {result['ratio']:.2f}x (target >= {TARGET_RATIO}x: "
        f"{verdict[result['meets_targets']['ratio']]})",
        f"  MFU ours vs this run's fp32 matmul peak {peak['flops'] / 1e9:.0f} GFLOP/s on "
        f"{result['device']} (best of {len(result['peak_probes'])} probes, "
        f"{_probe_place(peak)}; target >= {TARGET_MFU:.0%}: "
        f"{verdict[result['meets_targets']['mfu']]})",
        f"  losses agree: max |ours - HF| = {result['loss_max_abs_diff']:.2e} over "
        f"{result['warmup'] + result['steps']} steps (tolerance {result['loss_tolerance']:.0e}: "
        f"{verdict[result['losses_agree']]})",
    ]
    return "\n".join(lines)


def _probe_place(probe: dict) -> str:
    return ("before step 1" if probe["after_step"] is None
            else f"after step {probe['after_step'] + 1}")


# ---------------------------------------------------------------------------------------------
# The sides: one spawned process each, driven over a pipe
# ---------------------------------------------------------------------------------------------

class WorkerProcess:
    """A spawned process holding one object, built there as ``build(*args)`` (a class or
    function of a module, so that it pickles by name); ``call(method, *args)`` runs one of
    its methods there and waits for the answer. ``started`` is the object's ``started``."""

    def __init__(self, name: str, build, *args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, self._child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(build, args, self._child_conn),
                                        name=f"bench-{name}", daemon=True)
        self.name = name

    def __enter__(self) -> "WorkerProcess":
        self._process.start()
        self._child_conn.close()  # the child's end lives in the child: its exit reads as EOF
        self.started = self._receive()
        return self

    def __exit__(self, *exc) -> None:
        if self._process.is_alive() and exc[0] is None:
            self._conn.send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def call(self, method: str, *args):
        self._conn.send((method, *args))
        return self._receive()

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._process.join(timeout=30)
            raise RuntimeError(f"the {self.name} benchmark process died (exit code "
                               f"{self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the {self.name} benchmark process failed:\n{payload}")
        return payload


def _serve(build, args: tuple, conn) -> None:
    """Worker main loop: build the object, then run the methods asked for until ``stop``."""
    import traceback

    try:
        served = build(*args)
        conn.send(("ok", served.started))
        while (message := conn.recv())[0] != "stop":
            conn.send(("ok", getattr(served, message[0])(*message[1:])))
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class TrainingSide:
    """One side of the training bench, in its worker process: ``step`` trains one timed step,
    ``report`` gives the peak RSS and the settings the steps ran with."""

    def __init__(self, side: str, settings: BenchSettings, weights: Path,
                 optimizer: dict | None = None):
        import torch

        torch.set_num_threads(settings.threads)
        if side == "ours":
            self.trainer = OursTrainer(settings, weights)
        else:
            self.trainer = HFTrainer(settings, weights, optimizer)
        _use_adamw_implementation(self.trainer.torch_optimizers, settings.adamw)
        self.started = {"parameters": self.trainer.parameters,
                        "optimizer": self.trainer.optimizer_settings}

    def step(self, index: int) -> tuple[float, float]:
        """The step's loss and seconds."""
        import time

        start = time.perf_counter()
        loss = self.trainer.step(index)
        return loss, time.perf_counter() - start

    def report(self) -> dict:
        from megatron_hybrid.engine import metrics

        settings = process_settings_report(self.trainer.kernels())
        settings["optimizer"] = adamw_implementation(self.trainer.torch_optimizers)
        return {"memory": metrics.peak_memory()[0], "settings": settings}


# ---------------------------------------------------------------------------------------------
# Settings: applied the same way on both sides, and read back from the live process
# ---------------------------------------------------------------------------------------------

def _use_adamw_implementation(torch_optimizers: list, name: str) -> None:
    """Run every step of these torch optimizers with AdamW implementation ``name``. A step
    pre-hook, so it follows any hook registered before (the engine's own fused choice)."""
    flags = ADAMW_IMPLEMENTATIONS[name]

    def set_flags(optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            group.update(flags)

    for optimizer in torch_optimizers:
        optimizer.register_step_pre_hook(set_flags)


def apply_process_settings(without: tuple[str, ...]) -> None:
    """The cpu backend's process settings, from its own functions, less ``without``."""
    from megatron_hybrid.backends import cpu

    if "flush_denormal" not in without:
        cpu.flush_denormals_on_every_thread()
    if "heap_retention" not in without:
        cpu.keep_freed_memory_in_heap()


def process_settings_report(kernels: str) -> dict:
    """This process's settings as they act now: ``threads``, the :data:`PROCESS_SETTINGS`
    and ``kernels`` (the code path, named by the caller)."""
    import torch

    return {"threads": torch.get_num_threads(), "flush_denormal": denormals_flushed(),
            "heap_retention": large_allocations_stay_in_heap(), "kernels": kernels}


def settings_unequal(ours: dict, peer: dict, keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` whose values differ between two sides' settings reports."""
    return [key for key in keys if ours[key] != peer[key]]


def denormals_flushed() -> bool | str:
    """Whether arithmetic on denormal floats gives zero: True on every intra-op thread (the
    tensor is large enough to be split over all of them), False on none, else "partial"."""
    import torch

    threads = torch.get_num_threads()
    smallest = torch.ones(threads * 2**16, dtype=torch.int32).view(torch.float32)  # 2**-149
    flushed = (smallest * 2).eq(0)
    return True if flushed.all() else False if not flushed.any() else "partial"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def large_allocations_stay_in_heap() -> bool | None:
    """Whether a large tensor comes from glibc's heap rather than a fresh ``mmap`` (glibc maps
    anything above 32 MiB by default); None without glibc's ``mallinfo2``. The tensor is 64 MiB
    larger than all the heap's free space, so no freed chunk can serve it and glibc has to
    choose between growing the heap and mapping; it is never touched, so it costs no memory."""
    import torch

    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    before = mallinfo2()
    block = torch.empty(before.fordblks + 2**26, dtype=torch.uint8)
    stayed = mallinfo2().hblkhd == before.hblkhd
    del block
    return stayed


def adamw_implementation(torch_optimizers: list) -> str:
    """The optimizers' class and implementation from their param-group flags, e.g.
    ``torch.optim.AdamW(fused=True)``; several kinds are joined by ``+``."""
    kinds = set()
    for optimizer in torch_optimizers:
        cls = type(optimizer)
        module = "torch.optim" if cls.__module__.startswith("torch.optim.") else cls.__module__
        for group in optimizer.param_groups:
            flag = ("fused=True" if group.get("fused") else
                    "foreach=True" if group.get("foreach") else "for-loop")
            kinds.add(f"{module}.{cls.__name__}({flag})")
    return " + ".join(sorted(kinds))


# ---------------------------------------------------------------------------------------------
# The two trainers
# ---------------------------------------------------------------------------------------------

def token_batch(settings: BenchSettings, step: int):
    """(batch, seq + 1) random token ids of ``step``, the same on both sides."""
    import torch

    generator = torch.Generator().manual_seed(settings.seed + step)
    return torch.randint(0, settings.model.vocab_size,
                         (settings.batch_size, settings.model.seq_length + 1),
                         generator=generator)


class OursTrainer:
    """The Megatron-Core model on the cpu backend, trained by ``engine.train_step``; writes
    its initial weights in HF's names to ``weights`` for the HF side."""

    def __init__(self, settings: BenchSettings, weights: Path):
        from megatron_hybrid import backends

        backends.install("cpu")
        from megatron_hybrid.engine import training_step
        from megatron_hybrid.model.build import ModelLayout, build_model
        from megatron_hybrid.parallel import process_groups

        process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
        process_groups.seed_everything(settings.seed)
        model = build_model(settings.model, ModelLayout(), backend="cpu")
        save_hf_weights(model, settings.model, weights)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=False,
                                              backend="cpu")]
        optimizer_settings = training_step.OptimizerSettings()
        self.optimizer = training_step.build_optimizer(self.chunks, optimizer_settings)
        self.torch_optimizers = [part.optimizer for part in
                                 getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        self.optimizer_settings = dataclasses.asdict(optimizer_settings)
        self.settings = settings

    @staticmethod
    def kernels() -> str:
        return ours_kernels()

    def step(self, index: int) -> float:
        from megatron_hybrid.engine import training_step

        tokens = token_batch(self.settings, index)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                 "loss_mask": tokens.new_ones(tokens[:, 1:].shape, dtype=float)}
        result = training_step.train_step(
            self.chunks, self.optimizer, iter([batch]), num_microbatches=1,
            micro_batch_size=self.settings.batch_size, seq_length=self.settings.model.seq_length)
        return result.loss


class HFTrainer:
    """HF ``NemotronHForCausalLM`` on its torch reference path, from the weights
    ``OursTrainer`` wrote, in a process with the cpu backend's process settings (less
    ``settings.peer_without``), with AdamW set up as Megatron sets it up from ``optimizer``
    (``engine.OptimizerSettings`` fields)."""

    def __init__(self, settings: BenchSettings, weights: Path, optimizer: dict):
        require_hf_torch_path()
        apply_process_settings(settings.peer_without)
        self.model = hf_model(settings.model, weights).train()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.optimizer = _adamw_as_megatron(self.model, optimizer)
        self.torch_optimizers = [self.optimizer]
        self.optimizer_settings = optimizer
        self.clip_grad = optimizer["clip_grad"]
        self.settings = settings

    def step(self, index: int) -> float:
        import torch
        import torch.nn.functional as F

        tokens = token_batch(self.settings, index)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(input_ids=tokens[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        return loss.item()

    def kernels(self) -> str:
        return hf_kernels(self.model)


def ours_kernels() -> str:
    """The scan Megatron-Core's ``MambaMixer`` bound at import, by its defining module."""
    from megatron_hybrid import mcore

    scan = sys.modules[mcore.MambaMixer.__module__].mamba_split_conv1d_scan_combined
    return f"Megatron-Core MambaMixer + {scan.__module__}.{scan.__name__}"


def hf_kernels(model) -> str:
    """HF's Mamba-2 mixer class; its torch path, as no kernel package can be imported."""
    require_hf_torch_path()
    (mixer,) = {type(module) for module in model.modules()
                if type(module).__name__.endswith("Mamba2Mixer")}
    return f"{mixer.__module__}.{mixer.__qualname__} torch path"


def require_hf_torch_path() -> None:
    """transformers binds ``mamba_ssm`` / ``causal_conv1d`` when they import (the cpu
    backend registers ours under those names): then HF would not run its own code."""
    import importlib.util

    found = [name for name in ("mamba_ssm", "causal_conv1d")
             if name in sys.modules or importlib.util.find_spec(name) is not None]
    if found:
        raise RuntimeError(f"{', '.join(found)} importable: HF would not run its torch path")


def save_hf_weights(model, cfg: ModelConfig, path: Path) -> None:
    """Our model's weights in HF NemotronH's names, for :func:`hf_model`."""
    import torch

    from megatron_hybrid.model import hf_mapping

    torch.save(hf_mapping.mcore_to_hf_state_dict(model.state_dict(), cfg), path)


def hf_model(cfg: ModelConfig, weights: Path):
    """HF ``NemotronHForCausalLM`` of ``cfg`` with the weights :func:`save_hf_weights`
    wrote."""
    import torch
    from transformers import NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_hybrid.model import hf_mapping

    hf_logging.set_verbosity_error()  # not its notes on falling back to the torch kernels
    with torch.device("meta"):  # HF's own init refuses time_step_min=0 (see convert)
        model = NemotronHForCausalLM(hf_mapping.hf_config_from_model(cfg))
    model = model.to_empty(device="cpu")
    model.load_state_dict(torch.load(weights), strict=True)
    return model


def _adamw_as_megatron(model, optimizer: dict):
    """torch AdamW (Megatron-Core's choice on the CPU) with Megatron's parameter groups:
    no weight decay on 1-D parameters (norms, biases, A_log, D, dt_bias)."""
    import torch

    groups = [
        {"params": [p for p in model.parameters() if p.dim() > 1],
         "weight_decay": optimizer["weight_decay"]},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optimizer["lr"], eps=optimizer["adam_eps"],
                             betas=(optimizer["adam_beta1"], optimizer["adam_beta2"]))
