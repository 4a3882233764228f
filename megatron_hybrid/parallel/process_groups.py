"""Process groups and seeds through Megatron-Core's parallel_state.

``ParallelDims`` infers data parallel from the world size and names every factor when the
layout does not fit (torchtitan's habit).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.parallel.config import check_expert_world_size


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    world_size: int = 1
    ep: int = 1
    """Expert parallel: the routed experts split over ``ep`` ranks."""
    etp: int | None = None
    """Expert tensor parallel; None: tp (Megatron-Core's default)."""

    @classmethod
    def of(cls, parallel, world_size: int) -> "ParallelDims":
        """The dims of a ``parallel:`` section (:class:`~megatron_hybrid.parallel.config.
        ParallelConfig`) on ``world_size`` ranks."""
        return cls(tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, ep=parallel.ep,
                   etp=parallel.etp, world_size=world_size)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def layout(self) -> dict[str, int]:
        """The layout as checkpoints record it."""
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep, "dp": self.dp}

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        if self.world_size % self.model_parallel:
            raise ConfigError(
                f"parallel: tp({self.tp}) * pp({self.pp}) * cp({self.cp}) * dp(?) does not "
                f"divide world size {self.world_size}: choose sizes whose product divides it")
        return self.world_size // self.model_parallel


def init_distributed(dims: ParallelDims, *, backend: str, timeout_minutes: int = 10) -> None:
    """Start torch.distributed (from torchrun's environment, or a 1-process group) and
    Megatron-Core's model-parallel groups for ``dims``."""
    from megatron_hybrid import mcore

    device = None
    if backend == "cuda":
        # Before the group: NCCL binds its communicator to the current device, and device_id
        # lets it connect eagerly instead of guessing the device from the rank.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _store(timeout)
        dist.init_process_group(
            backend="nccl" if backend == "cuda" else "gloo",
            store=store,
            rank=int(os.environ.get("RANK", 0)) if store else -1,
            world_size=int(os.environ.get("WORLD_SIZE", 1)) if store else -1,
            timeout=timeout,
            device_id=device,
        )
    dims.dp  # noqa: B018  (raises the one-line layout errors before any group exists)
    check_expert_world_size(dims.expert_tp, dims.ep, dims.pp, dims.world_size)
    mcore.parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.expert_tp,
        distributed_timeout_minutes=timeout_minutes,
    )


def _store(timeout: datetime.timedelta):
    """The process group's store; None: torch's env:// rendezvous (under torchrun, first try).

    Alone: an in-memory store, no port to race for. After a torchrun restart
    (``--max-restarts``) the agent's store still holds the failed attempt's process-group keys,
    and gloo would connect to its dead ranks' ports: each attempt gets its own key prefix.
    """
    if "WORLD_SIZE" not in os.environ:
        return dist.HashStore()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                is_master=False, timeout=timeout)
    return dist.PrefixStore(f"attempt_{attempt}", agent_store)


def seed_everything(seed: int) -> None:
    """Megatron-Core's seeding: data-parallel state shared, tensor-parallel state per TP rank."""
    from megatron_hybrid import mcore

    torch.manual_seed(seed)
    mcore.tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron_hybrid import mcore

    mcore.parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
