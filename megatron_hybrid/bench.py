"""``megatron-hybrid bench``: our training step against HF transformers' ``NemotronHForCausalLM``.

Both sides train the same model (pattern, widths, vocabulary; fp32) from the same weights on
the same token batches with the same AdamW settings and gradient clipping:

- **ours**: Megatron-Core's ``MambaModel`` on the cpu backend, stepped by ``engine.train_step``
  (DDP buffers, the schedule, Megatron's optimizer) exactly as ``megatron-hybrid train`` does;
- **HF**: ``NemotronHForCausalLM`` on its own PyTorch path, stepped by a plain loop (forward,
  cross-entropy, backward, ``clip_grad_norm_``, ``torch.optim.AdamW``).

Each side runs in its own spawned process: HF's process never installs the cpu backend, so
``mamba_ssm`` / ``causal_conv1d`` cannot be imported there and transformers binds its torch
kernels (checked at start), and each side's peak resident memory is its own. The parent
alternates steps (ours, HF, HF, ours, ...: ABBA rounds cancel drift), so both see the same
machine load, and reports medians over the timed steps. The losses of the two sides are
compared step by step: equal losses show that both computed the same model.

FLOPs per token come from :func:`metrics.flops_per_token`; MFU is against the fp32 matmul
peak measured on this machine (:func:`metrics.device_peak_flops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_hybrid.config import ModelConfig

HELP = "training throughput of ours vs HF transformers' NemotronH on the same model (fp32)"

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
"""Our model FLOP/s over the measured fp32 matmul peak on the default config."""
SIDES = ("ours", "hf")
LABELS = {"ours": "ours (Megatron-Core)", "hf": "HF NemotronH"}


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
    seed: int = 1234

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.seq_length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name in SHAPE_FIELDS:
        default = getattr(DEFAULT_MODEL, name)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(default),
                            default=default, help=f"model.{name} (default {default})")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per side (default: torch's, i.e. the cores)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    model = DEFAULT_MODEL.replace(**{name: getattr(args, name) for name in SHAPE_FIELDS})
    model.validate()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 0:
        raise ValueError("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --threads >= 0")
    return BenchSettings(model=model, batch_size=args.batch_size, warmup=args.warmup,
                         steps=args.steps, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    result = benchmark(settings, progress=None if args.json else sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: start both sides, alternate their steps, summarise
# ---------------------------------------------------------------------------------------------

def benchmark(settings: BenchSettings, progress=None) -> dict:
    """Run the benchmark and return its results (see :func:`format_report` for the fields)."""
    import torch

    from megatron_hybrid import metrics

    threads = settings.threads or torch.get_num_threads()
    settings = dataclasses.replace(settings, threads=threads)
    torch.set_num_threads(threads)  # the peak probe runs at the workers' thread count
    with tempfile.TemporaryDirectory(prefix="megatron-hybrid-bench-") as tmp:
        weights = Path(tmp) / "hf_weights.pt"
        with _Side("ours", settings, weights) as ours:  # writes the weights HF starts from
            with _Side("hf", settings, weights, ours.started["optimizer"]) as hf:
                losses, seconds = _alternate({"ours": ours, "hf": hf}, settings, progress)
                memory = {"ours": ours.call("memory"), "hf": hf.call("memory")}
                parameters = {"ours": ours.started["parameters"], "hf": hf.started["parameters"]}
    device, peak = metrics.device_peak_flops(torch.float32)
    flops = metrics.flops_per_token(settings.model, settings.model.seq_length)["total"]
    return summarise(settings, parameters, losses, seconds, memory, flops, device, peak)


def _alternate(sides: dict, settings: BenchSettings, progress) -> tuple[dict, dict]:
    """Step both sides in ABBA order; per side, every step's loss and seconds (warm-up too)."""
    losses = {side: [] for side in SIDES}
    seconds = {side: [] for side in SIDES}
    total = settings.warmup + settings.steps
    for step in range(total):
        for side in SIDES if step % 2 == 0 else SIDES[::-1]:
            loss, elapsed = sides[side].call("step", step)
            losses[side].append(loss)
            seconds[side].append(elapsed)
        if progress is not None:
            kind = "warm-up" if step < settings.warmup else "timed"
            print(f"  step {step + 1}/{total} ({kind}): " + ", ".join(
                f"{side} {seconds[side][-1]:.2f} s loss {losses[side][-1]:.4f}" for side in SIDES),
                file=progress, flush=True)
    return losses, seconds


def summarise(settings: BenchSettings, parameters: dict, losses: dict, seconds: dict,
              memory: dict, flops_per_token: float, device: str,
              peak_flops: float | None) -> dict:
    """The results as a JSON-ready dict; medians over the timed steps. The per-side inputs
    are dicts by side: parameter counts, every step's loss and seconds, peak RSS bytes."""
    per_side = {}
    for side in SIDES:
        timed = seconds[side][settings.warmup:]
        median = statistics.median(timed)
        tokens_per_s = settings.tokens_per_step / median
        flops_per_s = flops_per_token * tokens_per_s
        per_side[side] = {
            "step_seconds_median": median, "step_seconds": timed,
            "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
            "mfu": flops_per_s / peak_flops if peak_flops else None,
            "peak_rss_bytes": memory[side], "losses": losses[side],
            "parameters": parameters[side],
        }
    ratio = per_side["ours"]["tokens_per_s"] / per_side["hf"]["tokens_per_s"]
    loss_diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"]))
    return {
        "model": settings.model.to_dict(), "parameters": parameters["ours"],
        "batch_size": settings.batch_size, "seq_length": settings.model.seq_length,
        "tokens_per_step": settings.tokens_per_step, "warmup": settings.warmup,
        "steps": settings.steps, "threads": settings.threads, "device": device,
        "peak_flops": peak_flops, "flops_per_token": flops_per_token,
        "ours": per_side["ours"], "hf": per_side["hf"], "ratio": ratio,
        "loss_max_abs_diff": loss_diff,
        "targets": {"ratio": TARGET_RATIO, "mfu": TARGET_MFU},
        "meets_targets": {"ratio": ratio >= TARGET_RATIO,
                          "mfu": (per_side["ours"]["mfu"] or 0) >= TARGET_MFU},
    }


def format_report(result: dict) -> str:
    model = result["model"]
    lines = [
        f"bench: pattern {model['pattern']}, hidden {model['hidden_size']}, "
        f"{result['parameters'] / 1e6:.1f}M parameters, seq {result['seq_length']} x batch "
        f"{result['batch_size']}, fp32, {result['threads']} threads",
        f"  {result['warmup']} warm-up + {result['steps']} timed steps per side, alternating; "
        "medians",
        f"  {'':<22}{'tokens/s':>10}{'s/step':>9}{'GFLOP/s':>10}{'MFU':>8}{'peak RSS':>11}",
    ]
    for side in SIDES:
        r = result[side]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"  {LABELS[side]:<22}{r['tokens_per_s']:>10.0f}"
                     f"{r['step_seconds_median']:>9.3f}{r['flops_per_s'] / 1e9:>10.1f}"
                     f"{mfu:>8}{r['peak_rss_bytes'] / 2**30:>7.2f} GiB")
    peak = result["peak_flops"]
    peak_text = f"{peak / 1e9:.0f} GFLOP/s" if peak else "n/a"
    verdict = {True: "met", False: "not met"}
    lines += [
        f"  ratio ours/HF: {result['ratio']:.2f}x (target >= {TARGET_RATIO}x: "
        f"{verdict[result['meets_targets']['ratio']]})",
        f"  MFU ours vs measured fp32 matmul peak {peak_text} on {result['device']} "
        f"(target >= {TARGET_MFU:.0%}: {verdict[result['meets_targets']['mfu']]})",
        f"  losses agree: max |ours - HF| = {result['loss_max_abs_diff']:.2e} over "
        f"{result['warmup'] + result['steps']} steps",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The sides: one spawned process each, driven over a pipe
# ---------------------------------------------------------------------------------------------

class _Side:
    """A worker process running one side; ``call(command, *args)`` waits for its answer."""

    def __init__(self, side: str, settings: BenchSettings, weights: Path,
                 optimizer: dict | None = None):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, self._child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(side, settings, weights, optimizer, self._child_conn),
            name=f"bench-{side}", daemon=True)
        self.side = side

    def __enter__(self) -> "_Side":
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

    def call(self, command: str, *args):
        self._conn.send((command, *args))
        return self._receive()

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._process.join(timeout=30)
            raise RuntimeError(f"the {self.side} benchmark process died (exit code "
                               f"{self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the {self.side} benchmark process failed:\n{payload}")
        return payload


def _serve(side: str, settings: BenchSettings, weights: Path, optimizer: dict | None,
           conn) -> None:
    """Worker main loop: build the side, then answer ``step`` / ``memory`` / ``stop``."""
    import time
    import traceback

    import torch

    from megatron_hybrid import metrics

    try:
        torch.set_num_threads(settings.threads)
        if side == "ours":
            trainer = OursTrainer(settings, weights)
        else:
            trainer = HFTrainer(settings, weights, optimizer)
        conn.send(("ok", {"parameters": trainer.parameters,
                          "optimizer": trainer.optimizer_settings}))
        while (message := conn.recv())[0] != "stop":
            if message[0] == "step":
                start = time.perf_counter()
                loss = trainer.step(message[1])
                conn.send(("ok", (loss, time.perf_counter() - start)))
            else:
                conn.send(("ok", metrics.peak_memory()[0]))
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


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
        import torch

        from megatron_hybrid import convert, engine, parallel
        from megatron_hybrid.model import ModelLayout, build_model

        parallel.init_distributed(parallel.ParallelDims(), backend="cpu")
        parallel.seed_everything(settings.seed)
        model = build_model(settings.model, ModelLayout(), backend="cpu")
        torch.save(convert.mcore_to_hf_state_dict(model.state_dict(), settings.model), weights)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.chunks = [engine.wrap_ddp(model, use_distributed_optimizer=False)]
        optimizer_settings = engine.OptimizerSettings()
        self.optimizer = engine.build_optimizer(self.chunks, optimizer_settings)
        self.optimizer_settings = dataclasses.asdict(optimizer_settings)
        self.settings = settings

    def step(self, index: int) -> float:
        from megatron_hybrid import engine

        tokens = token_batch(self.settings, index)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                 "loss_mask": tokens.new_ones(tokens[:, 1:].shape, dtype=float)}
        result = engine.train_step(
            self.chunks, self.optimizer, iter([batch]), num_microbatches=1,
            micro_batch_size=self.settings.batch_size, seq_length=self.settings.model.seq_length)
        return result.loss


class HFTrainer:
    """HF ``NemotronHForCausalLM`` on its own torch path, from the weights ``OursTrainer``
    wrote, with AdamW set up as Megatron sets it up from ``optimizer``
    (``engine.OptimizerSettings`` fields)."""

    def __init__(self, settings: BenchSettings, weights: Path, optimizer: dict):
        _require_hf_torch_path()
        self.model = _hf_model(settings.model, weights)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.optimizer = _adamw_as_megatron(self.model, optimizer)
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


def _require_hf_torch_path() -> None:
    """transformers binds ``mamba_ssm`` / ``causal_conv1d`` when they import (the cpu
    backend registers ours under those names): then HF would not run its own code."""
    import importlib.util

    found = [name for name in ("mamba_ssm", "causal_conv1d")
             if name in sys.modules or importlib.util.find_spec(name) is not None]
    if found:
        raise RuntimeError(f"{', '.join(found)} importable: HF would not run its torch path")


def _hf_model(cfg: ModelConfig, weights: Path):
    import torch
    from transformers import NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    from megatron_hybrid import convert

    hf_logging.set_verbosity_error()  # not its notes on falling back to the torch kernels
    with torch.device("meta"):  # HF's own init refuses time_step_min=0 (see convert)
        model = NemotronHForCausalLM(convert.hf_config_from_model(cfg))
    model = model.to_empty(device="cpu")
    model.load_state_dict(torch.load(weights), strict=True)
    return model.train()


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
