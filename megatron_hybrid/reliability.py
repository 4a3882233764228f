"""Faults a run survives: preemption signals, NaN/Inf steps, loss spikes; and test hooks.

``Watchdog`` wraps the training loop. It turns SIGTERM / SIGUSR1 (Slurm's warning before a
time limit) into "finish this step, save, exit 0", agreed by every rank through one all-reduce
per step; it counts steps whose update was skipped for a NaN/Inf gradient (``SkipNonFinite``)
and, when ``train.loss_spike_factor`` is set, loss spikes; past ``train.max_bad_steps`` it stops
the run after a checkpoint and a ``numerics.json`` of the recent losses and grad norms.

Test hooks: ``MEGATRON_HYBRID_FAULT`` injects faults, comma-separated ``ACTION@WHERE[:RANK]``:
``kill@save.POINT`` (SIGKILL the saving process group at a named point of a checkpoint save),
``exit@step.N`` (the rank dies with ``os._exit`` after step N), ``nan@step.N`` (the loss of
step N is NaN). They fire on torchrun's first attempt only, so a restart shows the recovery.
``MEGATRON_HYBRID_SAVE_TRACE`` names a file each save point appends its name to, so a test
knows where a kill landed. Unset (every real run), each hook is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

FAULT_ENV = "MEGATRON_HYBRID_FAULT"
SAVE_TRACE_ENV = "MEGATRON_HYBRID_SAVE_TRACE"
"""A file every save point appends its name to (one a line): how far a killed save got."""
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DIAGNOSIS = "numerics.json"
"""Written to the run directory when too many bad steps stop a run."""
HISTORY = 20
"""Steps of loss / grad norm kept for the spike baseline and the diagnosis file."""


class TrainingHalted(RuntimeError):
    """Too many bad steps: the message names the saved state and what to change."""


# -- test hooks ---------------------------------------------------------------------------------

def injected(action: str, where: str) -> bool:
    """Whether ``MEGATRON_HYBRID_FAULT`` asks for ``action@where`` on this rank now."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    rank = dist.get_rank() if dist.is_initialized() else 0
    for item in spec.split(","):
        fault, _, on_rank = item.partition(":")
        if fault == f"{action}@{where}" and (not on_rank or int(on_rank) == rank):
            return True
    return False


def save_point(name: str) -> None:
    """A named point inside a checkpoint save: traced when a test asks, and where a test can
    kill the save.

    The kill takes the whole process group (the saving process and the shard writers it
    forked: each torchrun rank has a session of its own), as a lost node would; killing one
    writer alone would leave its parent waiting for it forever.
    """
    trace = os.environ.get(SAVE_TRACE_ENV)
    if trace:
        with open(trace, "a") as handle:  # appends of one short line do not interleave
            handle.write(f"{name}\n")
    if injected("kill", f"save.{name}"):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def exit_point(step: int) -> None:
    """Where a test makes this rank die abruptly (no cleanup, as a crashed node)."""
    if injected("exit", f"step.{step}"):
        print(f"injected fault: rank {dist.get_rank()} dies after step {step}", flush=True)
        os._exit(1)


def with_nan_loss(forward_step, step: int):
    """``forward_step``, made to return a NaN loss when a test asks for it at ``step``."""
    if not injected("nan", f"step.{step}"):
        return forward_step

    def poisoned(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        return output * float("nan"), loss_func

    return poisoned


# -- skipping NaN/Inf updates -------------------------------------------------------------------

class SkipNonFinite:
    """A Megatron-Core optimizer whose update is skipped when any gradient is NaN/Inf.

    Megatron-Core skips such steps only under fp16 loss scaling; fp32 and bf16 would apply the
    NaN. The check reads the reduced gradients before the optimizer touches them and agrees
    across all ranks. Everything else is the wrapped optimizer's.
    """

    def __init__(self, optimizer, model_chunks: list):
        self.optimizer = optimizer
        self.model_chunks = model_chunks
        self.update_applied = True
        """Whether the last ``step()`` changed the weights."""

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    @torch.no_grad()
    def step(self):
        device = next(self.model_chunks[0].parameters()).device
        self.update_applied = _all_ranks(self._grads_finite(), device)
        if not self.update_applied:
            return False, float("nan"), None
        return self.optimizer.step()

    def _grads_finite(self) -> bool:
        grads = [p.main_grad for chunk in self.model_chunks for p in chunk.parameters()
                 if p.requires_grad and getattr(p, "main_grad", None) is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank (one tiny all-reduce on the model's
    ``device``, which NCCL needs to be the GPU)."""
    value = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return not bool(value.item())


# -- the watchdog -------------------------------------------------------------------------------

class Watchdog:
    """Preemption, bad-step accounting and the stop decision of one training run."""

    def __init__(self, *, max_bad_steps: int, loss_spike_factor: float | None, run_dir: Path,
                 device: torch.device):
        self.device = device
        """Where the ranks' stop votes are all-reduced (the GPU under NCCL)."""
        self.max_bad_steps = max_bad_steps
        self.loss_spike_factor = loss_spike_factor
        self.run_dir = Path(run_dir)
        self.signal_name: str | None = None
        self.bad_steps: list[dict] = []
        self.recent: deque[dict] = deque(maxlen=HISTORY)
        self.stopping = False
        """Every rank agreed to stop after this step (preemption or too many bad steps)."""
        self._previous_handlers: dict = {}

    def __enter__(self) -> Watchdog:
        for signum in PREEMPT_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def after_step(self, step: int, *, loss: float, grad_norm: float, applied: bool) -> None:
        """Record step ``step``; decide, on every rank alike, whether the run stops now."""
        exit_point(step)
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "skipped": not applied}
        problem = self._problem(record)
        self.recent.append(record)
        if problem:
            self.bad_steps.append({**record, "problem": problem})
            _print0(f"step {step}: {problem} (bad step {len(self.bad_steps)} of "
                    f"train.max_bad_steps={self.max_bad_steps})")
        self.stopping = self.halted or not _all_ranks(self.signal_name is None, self.device)

    def _problem(self, record: dict) -> str | None:
        if record["skipped"] or not math.isfinite(record["loss"]):
            outcome = "update skipped" if record["skipped"] else "update applied"
            return (f"non-finite loss {record['loss']} or grad norm {record['grad_norm']}: "
                    f"{outcome}")
        finite = [r["loss"] for r in self.recent if math.isfinite(r["loss"])]
        if self.loss_spike_factor and len(finite) == HISTORY:
            baseline = sum(finite) / len(finite)
            if record["loss"] > self.loss_spike_factor * baseline:
                return (f"loss spike {record['loss']:.4g} > train.loss_spike_factor "
                        f"{self.loss_spike_factor} x mean of the last {HISTORY} ({baseline:.4g})")
        return None

    @property
    def halted(self) -> bool:
        return len(self.bad_steps) > self.max_bad_steps

    def finish(self, step: int, checkpoint: Path | None) -> None:
        """Report why the run stopped early; raise ``TrainingHalted`` after too many bad steps."""
        if self.halted:
            path = self.run_dir / DIAGNOSIS
            if dist.get_rank() == 0:
                path.write_text(json.dumps({"step": step, "checkpoint": str(checkpoint),
                                            "bad_steps": self.bad_steps,
                                            "recent": list(self.recent)}, indent=2))
            raise TrainingHalted(
                f"stopped at step {step}: {len(self.bad_steps)} bad steps exceed "
                f"train.max_bad_steps={self.max_bad_steps}; weights saved in {checkpoint}, "
                f"recent losses and grad norms in {path}: lower optimizer.lr or "
                f"optimizer.clip_grad, or check the data around these steps")
        if self.stopping:
            _print0(f"preempted ({self.signal_name or 'signal on another rank'}): stopped after "
                    f"step {step}, saved {checkpoint}; run the same command to resume")


def _print0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)
