"""LoRA adapters on Megatron-Core's tensor-parallel linears, swapped in through the layer specs.

A LoRA linear computes ``W x + (alpha / r) B A x`` with the base ``W`` frozen. Under tensor
parallel the adapter is sharded as its base:

- column-parallel base (QKV, fc1, Mamba in_proj; ``W`` split by output rows): ``A`` [r, in]
  replicated, ``B`` [out / tp, r] split by rows like ``W``;
- row-parallel base (output projection, fc2, Mamba out_proj; ``W`` split by input columns):
  ``A`` [r, in / tp] split by columns like ``W``, ``B`` [out, r] replicated.

The adapter's collectives act on its rank-r activation ``A x`` (copy / all-reduce, or
sequence-parallel gather / reduce-scatter), so a replicated factor's gradient is whole on
every rank; under sequence parallel it is a partial sum over the rank's tokens and is marked
``sequence_parallel`` for Megatron-Core's ``finalize_model_grads`` to all-reduce, as it does
for norms. Every base parameter is frozen (``requires_grad=False``), so Megatron-Core's DDP
and optimizer hold gradients and state for the adapters only.

The MoE layer's experts (``fc1`` / ``fc2`` of each routed expert and of the shared expert)
are the same linears. A routed expert's linear splits over the expert tensor-parallel group,
and when expert TP or EP is > 1 its tokens are moved by Megatron-Core's token dispatcher,
which also sums the row-parallel partial outputs (``explicit_expert_comm``): the adapter then
communicates no activation either, and its replicated factor, whose gradient is partial over
the expert-TP ranks, all-reduces that gradient itself. Expert adapters carry their base's
``allreduce`` flag, so DDP reduces them over the expert-data-parallel group as it does the
experts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from megatron_hybrid import mcore
from megatron_hybrid.model.config import LORA_COLUMN_TARGETS, PeftConfig

ADAPTER_PARAMETERS = ("lora_A", "lora_B")
"""The names of a LoRA linear's own parameters."""


class LoraLinear:
    """The adapter half of a LoRA linear, mixed into Megatron-Core's Column/RowParallelLinear.

    ``sharded_factor`` is the factor split over tensor parallel ("lora_B" for column-parallel,
    "lora_A" for row-parallel) and ``shard_dim`` the dimension of it (and of ``W``) that is
    split."""

    sharded_factor: str
    shard_dim: int

    def _add_adapter(self, config, peft: PeftConfig, in_features: int, out_features: int):
        self.scaling = peft.scaling
        self.adapter_active = True
        self.lora_dropout = torch.nn.Dropout(peft.dropout)
        device, dtype = self.weight.device, config.params_dtype
        self.lora_A = torch.nn.Parameter(torch.empty(peft.rank, in_features, device=device,
                                                     dtype=dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, peft.rank, device=device,
                                                     dtype=dtype))
        sharded = getattr(self, self.sharded_factor)
        mcore.tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, self.shard_dim, 1)
        replicated = self.lora_B if sharded is self.lora_A else self.lora_A
        # Partial over this rank's tokens under sequence parallel: all-reduced with the norms.
        # An expert's is not: the token dispatcher, not sequence parallel, splits its tokens
        # (see _replicated).
        setattr(replicated, "sequence_parallel", config.sequence_parallel and not self.is_expert)
        for factor in (self.lora_A, self.lora_B):
            # False for an expert under EP: DDP reduces it over the expert-data-parallel group.
            setattr(factor, "allreduce", self.weight.allreduce)
        if config.perform_initialization and device.type != "meta":
            self._initialize_a()

    def _initialize_a(self) -> None:
        """PEFT's init of A (Kaiming-uniform, a=sqrt(5), on the full fan-in), drawn whole from
        the generator all tensor-parallel ranks share and sliced: the same A at every TP size
        (B starts at zero, so the adapted model starts as its base)."""
        tp = self.tp_group.size()
        full_in = self.lora_A.shape[1] * (tp if self.sharded_factor == "lora_A" else 1)
        full = torch.empty(self.lora_A.shape[0], full_in, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        if self.sharded_factor == "lora_A":
            full = full.chunk(tp, dim=1)[self.tp_group.rank()]
        with torch.no_grad():
            self.lora_A.copy_(full)

    def _adapter_input(self, input_: torch.Tensor, sharded: bool) -> torch.Tensor:
        if not self.training or self.lora_dropout.p == 0:
            return input_
        if not sharded:  # replicated over TP: the generator all TP ranks share
            return self.lora_dropout(input_)
        with mcore.tensor_parallel.get_cuda_rng_tracker().fork():
            return self.lora_dropout(input_)

    def _replicated(self) -> torch.Tensor:
        """The factor replicated over TP, as the forward uses it. Under the token dispatcher
        (``explicit_expert_comm``) every expert-TP rank computes this expert's low-rank
        product for all its tokens, each with its own shard of the other factor, so the
        gradient of this factor is partial: all-reduced here over the expert-TP group."""
        replicated = self.lora_B if self.sharded_factor == "lora_A" else self.lora_A
        if not self.explicit_expert_comm:
            return replicated
        return mcore.tensor_parallel.copy_to_tensor_model_parallel_region(
            replicated, group=self.tp_group)

    def _sharded_state(self, prefix, sharded_offsets, metadata, axes: dict):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return mcore.make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {**axes, self.sharded_factor: self.shard_dim}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into this rank's shard of ``W`` (both factors' shards are local)
        and zero B: the layer computes the same function with the adapter adding nothing."""
        self.weight.copy_(merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling))
        self.lora_B.zero_()


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """``W + scaling * B A`` in ``W``'s dtype (the product in fp32)."""
    return weight + ((lora_b.float() @ lora_a.float()) * scaling).to(weight.dtype)


class LoraColumnParallelLinear(LoraLinear, mcore.ColumnParallelLinear):
    sharded_factor, shard_dim = "lora_B", 0

    def __init__(self, input_size: int, output_size: int, *, config, peft: PeftConfig,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._add_adapter(config, peft, input_size, self.output_size_per_partition)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight, runtime_gather_output)
        if not self.adapter_active:
            return output, bias
        # Under the token dispatcher the input already holds all of this expert's tokens.
        split_tokens = self.sequence_parallel and not self.explicit_expert_comm
        low_rank = F.linear(self._adapter_input(input_, split_tokens), self._replicated())
        if split_tokens:
            low_rank = mcore.tensor_parallel.gather_from_sequence_parallel_region(
                low_rank, group=self.tp_group)
        elif not self.explicit_expert_comm:
            # Backward all-reduces the partial gradients of this rank's B rows.
            low_rank = mcore.tensor_parallel.copy_to_tensor_model_parallel_region(
                low_rank, group=self.tp_group)
        delta = F.linear(low_rank, self.lora_B) * self.scaling
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            delta = mcore.tensor_parallel.gather_from_tensor_model_parallel_region(
                delta, group=self.tp_group)
        return output + delta, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_state(prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0})


class LoraRowParallelLinear(LoraLinear, mcore.RowParallelLinear):
    sharded_factor, shard_dim = "lora_A", 1

    def __init__(self, input_size: int, output_size: int, *, config, peft: PeftConfig,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        if not self.input_is_parallel:
            raise ValueError("LoRA on a row-parallel linear needs input_is_parallel=True")
        self._add_adapter(config, peft, self.input_size_per_partition, output_size)

    def forward(self, input_):
        output, bias = super().forward(input_)
        if not self.adapter_active:
            return output, bias
        # Each rank's A x is a partial sum over its input columns: reduce it, as the base
        # reduces W x; under the token dispatcher B A x stays partial, as W x does, and the
        # dispatcher sums both.
        low_rank = F.linear(self._adapter_input(input_, sharded=True), self.lora_A)
        if not self.explicit_expert_comm:
            reduce = (mcore.tensor_parallel.reduce_scatter_to_sequence_parallel_region
                      if self.sequence_parallel
                      else mcore.tensor_parallel.reduce_from_tensor_model_parallel_region)
            low_rank = reduce(low_rank, group=self.tp_group)
        return output + F.linear(low_rank, self._replicated()) * self.scaling, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_state(prefix, sharded_offsets, metadata, {"weight": 1})


def linear_spec(kind: str, peft: PeftConfig | None):
    """The linear a spec builds for target ``kind``: Megatron-Core's, or its LoRA subclass
    when ``peft`` adapts that kind."""
    column = kind in LORA_COLUMN_TARGETS
    if peft is None or not peft.enabled or kind not in peft.target_modules:
        return mcore.ColumnParallelLinear if column else mcore.RowParallelLinear
    return mcore.ModuleSpec(module=LoraColumnParallelLinear if column else LoraRowParallelLinear,
                            params={"peft": peft})


def lora_linears(model: torch.nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    return ((name, module) for name, module in model.named_modules()
            if isinstance(module, LoraLinear))


def is_adapter_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMETERS


def freeze_base(model: torch.nn.Module) -> None:
    """Only the adapters train: no gradient, DDP buffer or optimizer state for the base, and
    the MoE routers' expert bias (a buffer) held at the base's as well."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter_parameter(name))
    # finalize_model_grads moves the expert bias by a load-balancing rule, no gradient, at
    # this rate of the config the model's layers share: at zero the adapted model routes
    # tokens as its base does, and merged adapters meet the routing they were trained with.
    model.config.moe_router_bias_update_rate = 0.0


def merge_adapters(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight (see :meth:`LoraLinear.merge`)."""
    for _, linear in lora_linears(model):
        linear.merge()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model inside the block (DPO's reference): the adapters are skipped."""
    linears = [linear for _, linear in lora_linears(model)]
    for linear in linears:
        linear.adapter_active = False
    try:
        yield
    finally:
        for linear in linears:
            linear.adapter_active = True
