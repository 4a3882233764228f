"""The parallel section: layout and backend (``parallel:`` in a recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.errors import (
    ConfigError,
    check_choice,
    check_positive_int,
    divisors,
    is_positive_int,
)

BACKENDS = ("auto", "cpu", "cuda")
MOE_DISPATCHERS = ("alltoall", "allgather")


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: splits attention heads, Mamba heads and MLP widths."""
    pp: int = 1
    """Pipeline-parallel size: splits the pattern's layers into stages (``|`` marks them)."""
    cp: int = 1
    """Context-parallel size: splits each sequence."""
    ep: int = 1
    """Expert-parallel size: splits each MoE layer's routed experts (carved out of dp * cp *
    tp, as Megatron-Core does; needs ``E`` layers and must divide model.num_moe_experts)."""
    etp: int | None = None
    """Expert tensor-parallel size: splits each expert's width; null: tp (Megatron-Core's
    default). ``etp * ep * pp`` must divide the world size."""
    moe_dispatcher: str = "alltoall"
    """How tokens reach their experts' ranks: ``alltoall`` (Megatron-Core's all-to-all token
    dispatcher) or ``allgather`` (every rank gathers all tokens, keeps its experts')."""
    sequence_parallel: bool = False
    """Shard norms and dropout activations along the sequence across the TP group (needs tp > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (Megatron-Core distributed optimizer)."""
    backend: str = "auto"
    """``cpu`` (gloo, torch kernels), ``cuda`` (NCCL, TE + mamba_ssm) or ``auto`` (cuda if a GPU
    is visible)."""
    timeout_minutes: float = 10.0
    """How long a collective waits for the other ranks before the run fails (a dead or hung
    rank then stops the job instead of hanging it)."""
    index_build_timeout_minutes: float = 120.0
    """How long the other ranks wait while rank 0 builds the dataset indices (Megatron-Core's
    builder holds them at a barrier; a multi-trillion-token blend takes longer than
    timeout_minutes)."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers;
    cuda with sequence parallel only)."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one model replica: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size: ``etp``, or tp when unset."""
        return self.tp if self.etp is None else self.etp

    def check_world_size(self, world_size: int) -> int:
        """The data-parallel size the world size leaves; ConfigError if tp*pp*cp does not
        divide it."""
        if not is_positive_int(world_size):
            raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
        product = self.model_parallel_size
        if world_size % product:
            working = ", ".join(str(d) for d in divisors(world_size))
            raise ConfigError(
                f"parallel: tp({self.tp}) * pp({self.pp}) * cp({self.cp}) * dp(?) does not "
                f"divide world size {world_size}: use a world size that is a multiple of "
                f"tp * pp * cp = {product} (e.g. {product}, {2 * product}, {3 * product}), or "
                f"choose tp * pp * cp among {working} (the divisors of {world_size})")
        check_expert_world_size(self.expert_tp, self.ep, self.pp, world_size)
        return world_size // product

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            check_positive_int(f"parallel.{name}", getattr(self, name))
        if self.etp is not None:
            check_positive_int("parallel.etp", self.etp)
        check_choice("parallel.backend", self.backend, BACKENDS)
        check_choice("parallel.moe_dispatcher", self.moe_dispatcher, MOE_DISPATCHERS)
        for name in ("timeout_minutes", "index_build_timeout_minutes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be > 0")
        if self.tp_comm_overlap and not self.sequence_parallel:
            raise ConfigError("parallel.tp_comm_overlap=true needs sequence parallel: set "
                              "parallel.sequence_parallel=true (and tp > 1)")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (tp is 1): "
                              "set parallel.tp=2 or more, or parallel.sequence_parallel=false")


def check_expert_world_size(etp: int, ep: int, pp: int, world_size: int) -> int:
    """The expert-data-parallel size (Megatron-Core's ``initialize_model_parallel``: experts
    lay out as etp * ep * pp * expert-dp over the world); ConfigError if etp*ep*pp does not
    divide the world size."""
    product = etp * ep * pp
    if world_size % product:
        raise ConfigError(
            f"parallel: etp({etp}) * ep({ep}) * pp({pp}) does not divide world size "
            f"{world_size} (experts lay out as etp * ep * pp * expert-dp): choose parallel.ep "
            f"and parallel.etp so that etp * ep * pp divides {world_size}")
    return world_size // product
