"""Memory and step-time planner: does a model, layout and sequence length fit a GPU, and how
fast does it train.

Training, per GPU (the most loaded pipeline stage):

- parameters, gradients and optimizer state of the stage's TP shard: fp32 runs keep 4 + 4 + 8
  bytes per parameter (weights, fp32 gradient buffer, Adam m and v); bf16 and FP8 runs
  2 + 4 + 12 (bf16 weights, fp32 gradient buffer, fp32 master weights, m and v). The
  distributed optimizer shards the optimizer part over DP x CP. With LoRA (``peft``) only the
  adapters have gradients and optimizer state; the frozen base keeps its weights alone (its
  activations are counted as full training's, an upper bound).
- mixture-of-experts layers: the routed experts' weights split over EP x expert-TP ranks,
  their optimizer state sharded by the distributed optimizer over the expert-data-parallel
  group (world / (etp * ep * pp), Megatron-Core's expert layout), the rest (shared expert,
  router) as the dense layers'. Routing is taken as balanced: each rank's experts receive as
  many routed copies as its own tokens make (``topk`` each), so EP shards the experts'
  weights, not their activations; the all-to-all volume of a step is reported beside the
  memory (:func:`expert_exchange`).
- activations: the bytes each layer kind keeps for backward per token (formulas for the
  ``cuda`` kernels, :func:`cuda_layer_activations`; measured by a probe for the ``cpu``
  backend's kernels, :func:`cpu_layer_activations`), times the micro-batch's tokens on this CP
  rank, times the micro-batches 1F1B keeps in flight on the stage
  (``min(pp - stage, micro-batches)``). Full recompute keeps only each layer's input; selective
  recompute drops the core attention's softmax statistics (flash-style kernels, TE's and
  torch's SDPA alike, never keep ``s x s`` scores, so selective recompute saves little here).
- on top, at the peak: the working set of the layer that runs (under full recompute with its
  recomputed activations), or while the loss is computed the 16-bit logits beside their fp32
  copy; and the output layer's weight gradient before it joins the fp32 gradient buffer. The
  loss keeps an fp32 softmax over the vocabulary (counted in the activations).

Inference on one GPU (bf16 weights): weights + KV cache (attention layers only) + SSM state
(fp32) and conv state (Mamba layers) + the working set of one prefill chunk (chunked prefill,
as vLLM serves long prompts).

Step time: model FLOPs per GPU (:func:`metrics.flops_per_token`, counted by layer kind; an
MoE layer's router, top-k routed experts and shared expert, not every expert) plus
recompute FLOPs, over the GPU's dense peak at :data:`KERNEL_EFFICIENCY`, stretched by the 1F1B
pipeline bubble ``(m + pp - 1) / m``. Communication (the experts' all-to-all included) is
assumed hidden.

One module because the memory model, the step-time model and the per-GPU verdicts all read
the same widths of one layer kind at a time (``Widths``); split, each would re-derive them.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

from megatron_hybrid.model import params as model_params
from megatron_hybrid.model.config import ModelConfig, PeftConfig
from megatron_hybrid.model.precision import fp8_recipe
from megatron_hybrid.parallel.config import check_expert_world_size

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

GIB = 2**30
MIB = 2**20
KERNEL_EFFICIENCY = 0.47
"""Fraction of dense peak a training step's kernels reach: the ~47% MFU NVIDIA reports for
Megatron-Core on H100, taken before pipeline bubbles and recompute."""
RUNTIME_RESERVE_BYTES = GIB // 2
"""GPU memory that is not tensors: CUDA context, cuBLAS / cuDNN workspaces."""
DEFAULT_PREFILL_CHUNK = 8192
"""Tokens per prefill step when serving (vLLM's chunked prefill)."""
CONV_KERNEL = 4
"""Mamba conv1d width (Megatron-Core's default; Nemotron-H's)."""


BASIS = {
    "parameters": "counted per layer kind; equal to the Megatron-Core model's count (tested)",
    "training": "derived from formulas for the cuda kernels' saved tensors, never measured on a "
                "GPU here; the same accounting with the cpu backend's layers is checked against "
                "measured CPU peaks (docs/planner.md)",
    "step": f"derived: model FLOPs over {KERNEL_EFFICIENCY:.0%} of the GPU's dense datasheet "
            "peak, never measured",
    "inference": "derived from formulas (weights, caches, one prefill chunk), never measured",
}
"""What each figure of a GPU plan rests on: this project's machines have no GPU."""


class PlanError(ValueError):
    """The plan's inputs do not describe a model or layout; the message says what to change."""


@dataclass(frozen=True)
class Gpu:
    device_name: str
    """``torch.cuda.get_device_name()`` of the card (keys metrics.GPU_PEAK_TFLOPS)."""
    memory_mib: int
    """Total memory as nvidia-smi reports it."""

    @property
    def usable_bytes(self) -> int:
        return self.memory_mib * MIB - RUNTIME_RESERVE_BYTES

    def peak_flops(self, precision: str) -> float | None:
        from megatron_hybrid.engine import metrics

        tensor_cores = "fp8" if fp8_recipe(precision) is not None else "bf16"
        return metrics.gpu_peak_flops(self.device_name, tensor_cores)


GPUS = {
    "a10g": Gpu("NVIDIA A10G", 23028),
    "l40s": Gpu("NVIDIA L40S", 46068),
    "a100-80g": Gpu("NVIDIA A100-SXM4-80GB", 81920),
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559),
    "h200": Gpu("NVIDIA H200", 143771),
}


# ---------------------------------------------------------------------------------------------
# Parameters per layer kind, split into the tensor-parallel shard and the replicated rest
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Widths:
    """The widths the formulas use, from a ModelConfig (symbols as in metrics.py)."""

    h: int
    f: int
    a: int
    g: int
    d: int
    heads: int
    head_dim: int
    state: int
    groups: int
    chunk: int
    vocab: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> Widths:
        return cls(h=cfg.hidden_size, f=cfg.ffn_hidden_size, a=cfg.num_attention_heads,
                   g=cfg.num_query_groups, d=cfg.kv_channels, heads=cfg.mamba_num_heads,
                   head_dim=cfg.mamba_head_dim, state=cfg.mamba_state_dim,
                   groups=cfg.mamba_num_groups, chunk=cfg.mamba_chunk_size, vocab=cfg.vocab_size)

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_width(self) -> int:
        """Channels of the Mamba conv: x, B and C."""
        return self.d_inner + 2 * self.groups * self.state

    @property
    def in_proj_width(self) -> int:
        """Mamba in_proj outputs: z, x, B, C, dt."""
        return 2 * self.d_inner + 2 * self.groups * self.state + self.heads


def layer_parameters(cfg: ModelConfig, symbol: str) -> tuple[int, int, int]:
    """``(sharded, replicated, experts)`` parameters of one layer: the part split across TP
    ranks, the part every TP rank holds (its pre-norm; an MoE layer's router) and an MoE
    layer's routed experts, split across EP x expert-TP ranks (its shared expert is TP's)."""
    w = Widths.of(cfg)
    # Mamba-2's in_proj, conv weight + bias, dt_bias / A_log / D; and attention's QKV
    ssm = w.h * w.in_proj_width + w.conv_width * (CONV_KERNEL + 1) + 3 * w.heads
    qkv = w.h * w.d * (w.a + 2 * w.g)
    if symbol == "M":  # + the gated norm and out_proj
        return ssm + w.d_inner + w.d_inner * w.h, w.h, 0
    if symbol == "*":
        return qkv + w.a * w.d * w.h, w.h, 0
    if symbol == "H":  # both branches, a norm each, one shared out_proj (model/parallel_heads.py)
        return qkv + ssm + 2 * w.d_inner + w.d_inner * w.h, w.h, 0
    if symbol == "-":
        return 2 * w.h * w.f, w.h, 0
    experts = cfg.num_moe_experts or 0
    shared = 2 * w.h * (cfg.moe_shared_expert_intermediate_size or 0)
    return shared, w.h + w.h * experts, experts * 2 * w.h * expert_width(cfg)


def expert_width(cfg: ModelConfig) -> int:
    """Inner width of one routed expert."""
    return cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size


class StageParameters(NamedTuple):
    """Parameters one rank of a pipeline stage holds."""

    dense: int
    """Everything but the routed experts: the TP shard and the replicated rest."""
    experts: int
    """This rank's share of the routed experts (1 / (ep * etp) of the stage's)."""


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, *, ep: int = 1,
                     etp: int | None = None) -> list[StageParameters]:
    """Parameters one rank of each pipeline stage holds (embedding on the first stage, final
    norm and untied output layer on the last), each layer at its own sizes
    (``model.layer_overrides``); routed experts split over ``ep`` x ``etp`` (None: tp, as
    Megatron-Core defaults)."""
    stages, offsets = cfg.layer_pattern.stages(pp), cfg.layer_pattern.stage_offsets(pp)
    expert_shards = ep * (tp if etp is None else etp)
    counts = []
    for index, stage in enumerate(stages):
        dense = experts = 0
        for layer, symbol in enumerate(stage, offsets[index]):
            sharded, replicated, routed = layer_parameters(cfg.for_layer(layer), symbol)
            dense += sharded // tp + replicated
            experts += routed // expert_shards
        if index == 0:  # the embedding and the meta tokens (every TP rank holds them)
            dense += cfg.vocab_size * cfg.hidden_size // tp + cfg.num_meta_tokens * cfg.hidden_size
        if index == len(stages) - 1:
            dense += cfg.vocab_size * cfg.hidden_size // tp + cfg.hidden_size
        counts.append(StageParameters(dense, experts))
    return counts


def total_parameters(cfg: ModelConfig) -> int:
    return sum(map(sum, stage_parameters(cfg, tp=1, pp=1)))


def active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token uses: all but the routed experts it is not sent to
    (``model.params``'s ``active``)."""
    idle = (cfg.num_moe_experts or 0) - cfg.moe_router_topk
    widths = [expert_width(cfg.for_layer(layer))
              for layer, symbol in enumerate(cfg.layer_pattern.layers) if symbol == "E"]
    return total_parameters(cfg) - idle * 2 * cfg.hidden_size * sum(widths)


# ---------------------------------------------------------------------------------------------
# Activations: bytes per token each layer kind keeps for backward, and needs while it runs
# ---------------------------------------------------------------------------------------------

KERNELS = ("cuda", "cpu")
"""Kernel sets: ``cuda`` (TE linears with fused norms, flash / fused attention, mamba_ssm's
fused conv + scan: formulas) and ``cpu`` (this project's cpu backend: measured by a probe)."""


@dataclass(frozen=True, kw_only=True)
class Sharding:
    """How one rank's share of a token's activations is cut."""

    tp: int = 1
    sequence_parallel: bool = False
    etp: int | None = None
    """Expert tensor-parallel size (None: tp)."""

    def hidden(self, width: float) -> float:
        """A hidden-size activation: split across TP ranks only under sequence parallel."""
        return width / self.tp if self.sequence_parallel else width

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def routed_rows(self) -> float:
        """Routed copies of one micro-batch token an MoE layer's experts hold on this rank,
        per experts chosen: tokens reach it through the EP all-to-all (balanced routing: as
        many as its own tokens send) and the expert-TP all-gather (``etp`` ranks' at once)."""
        return self.hidden(self.expert_tp)


@dataclass(frozen=True)
class LayerActivations:
    saved: float
    """Bytes per token the layer keeps for its backward."""
    working: float
    """Bytes per token alive on top of those while the layer runs forward or backward."""


def cuda_layer_activations(cfg: ModelConfig, symbol: str, *, precision: str,
                           sharding: Sharding = Sharding()) -> LayerActivations:
    """What TE / flash-attention / mamba_ssm layers save per token on one rank (``b`` bytes
    per 16-bit value, fp32 statistics 4), derived from the tensors each kernel saves:

    - Mamba: norm input and output ``2h``; in_proj output ``z x B C dt``; the scan's ungated
      output, the gated output and the normed output ``3 d_inner``; norm statistics;
    - attention: ``2h``; q, k, v ``(a + 2g) d`` (past ``g`` TP ranks each keeps a replica of
      one group's k and v, transformer/attention.py:289); output ``a d``; softmax statistics
      ``a``;
    - MLP: ``2h``; fc1 output and activation ``2f``;
    - MoE: ``2h``; the shared expert's ``2 f_shared``; router scores; the routed copies
      (:attr:`Sharding.routed_rows` per expert chosen), each ``h`` (the experts' input) and
      ``2 f_expert / etp`` (fc1 output and activation). Routing is taken as balanced over the
      EP ranks, so EP splits the experts' weights, not these activations.

    The working set of a layer is taken as its saved size (gradients of the same tensors),
    plus, past ``g`` TP ranks, the whole QKV output each rank all-gathers.
    """
    b = 4 if precision == "fp32" else 2
    w, tp, h = Widths.of(cfg), sharding.tp, sharding.hidden(cfg.hidden_size)
    if symbol == "M":
        values, stats = (w.in_proj_width + 3 * w.d_inner) / tp, 1 + w.groups / tp
    elif symbol == "*":
        qkv = w.a / tp + 2 * max(w.g / tp, 1)  # k, v: one group's at least
        values, stats = (qkv + w.a / tp) * w.d, 1 + w.a / tp
    elif symbol == "-":
        values, stats = 2 * w.f / tp, 1
    else:
        etp, shared = sharding.expert_tp, cfg.moe_shared_expert_intermediate_size or 0
        routed = cfg.moe_router_topk * sharding.routed_rows
        values = routed * (w.h + 2 * expert_width(cfg) / etp) + 2 * shared / tp
        stats = 1 + (cfg.num_moe_experts or 0)
    saved = b * (2 * h + values) + 4 * stats
    # Past g ranks Megatron-Core all-gathers the whole QKV output, then keeps this rank's
    # group (transformer/attention.py:1398).
    gathered = b * (w.a + 2 * w.g) * w.d if symbol == "*" and tp > w.g else 0.0
    return LayerActivations(saved=saved, working=saved + gathered)


def cpu_layer_activations(cfg: ModelConfig, *, micro_batch_size: int, seq_length: int,
                          recompute: str = "none") -> dict[str, LayerActivations]:
    """Per layer kind of ``cfg``, what the cpu backend's layers keep and need per token,
    measured: one layer of each kind built at the model's widths runs forward (saved tensors
    counted by storage through autograd's saved-tensor hooks) and backward (peak allocator
    bytes) on a ``micro_batch_size x seq_length`` input. Measured rather than derived
    because the torch kernels change; TP=1, no CP.
    """
    import torch

    from megatron_hybrid import backends
    from megatron_hybrid.model.params import single_process_model_parallel

    if backends.active() not in (None, "cpu"):
        raise RuntimeError(f"the cpu kernels' probe runs on the cpu backend; this process runs "
                           f"backend={backends.active()!r}: run it in a separate process")
    kinds = "".join(dict.fromkeys(cfg.layer_pattern.layers))
    probe_cfg = cfg.replace(pattern=kinds, seq_length=max(seq_length, cfg.seq_length),
                            layer_overrides={})  # one layer per kind, at the global sizes

    with single_process_model_parallel(), _rng_state_kept():
        from megatron_hybrid.model.build import ModelLayout, build_model  # after the backend

        layout = ModelLayout(recompute="selective" if recompute == "selective" else "none")
        model = build_model(probe_cfg, layout, backend="cpu")
        tokens = micro_batch_size * seq_length
        shape = (seq_length, micro_batch_size, cfg.hidden_size)
        return {symbol: _probe_layer(layer, torch.randn(shape), tokens)
                for symbol, layer in zip(kinds, model.decoder.layers)}


def _probe_layer(layer, hidden, tokens: int) -> LayerActivations:
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def forward_backward():
        hidden.requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            out = layer(hidden_states=hidden, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))

    _, peak = measure_cpu_peak(forward_backward)
    layer.zero_grad(set_to_none=True)
    kept = sum(saved.values())
    return LayerActivations(saved=kept / tokens, working=max(peak - kept, 0) / tokens)


def output_activation_bytes(cfg: ModelConfig, *, kernels: str, precision: str,
                            sharding: Sharding = Sharding()) -> float:
    """Bytes per token the last stage keeps after the layers: final norm and output layer
    inputs (three hidden-size copies on the cpu backend, two with TE), the cross entropy's
    fp32 softmax over the vocabulary shard, int64 labels and the loss mask."""
    b = 4 if kernels == "cpu" or precision == "fp32" else 2
    hidden_copies = 3 if kernels == "cpu" else 2
    return (b * hidden_copies * sharding.hidden(cfg.hidden_size) + 4
            + 4 * cfg.vocab_size / sharding.tp + 8 + 1)


INPUT_ACTIVATION_BYTES = 8
"""Per token on the first stage: the int64 token ids the embedding lookup keeps."""


# ---------------------------------------------------------------------------------------------
# Training memory per GPU
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TrainingLayout:
    """What the planner needs of a training run's layout."""

    seq_length: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    """Expert-parallel size: the routed experts split over ``ep`` ranks (carved out of
    tp * cp * dp, as Megatron-Core lays experts out)."""
    etp: int | None = None
    """Expert tensor-parallel size (None: tp)."""
    moe_dispatcher: str = "alltoall"
    """How tokens reach their experts' ranks (``parallel.moe_dispatcher``)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    micro_batch_size: int = 1
    num_microbatches: int = 1
    """Micro-batches per step on one data-parallel rank."""
    precision: str = "bf16"
    recompute: str = "none"
    peft: PeftConfig | None = None
    """LoRA adapters: only they train (None: full-parameter training)."""

    @classmethod
    def from_run(cls, cfg: RunConfig, world_size: int) -> TrainingLayout:
        dp = cfg.parallel.check_world_size(world_size)
        train = cfg.train
        return cls(seq_length=cfg.seq_length, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                   cp=cfg.parallel.cp, dp=dp, ep=cfg.parallel.ep, etp=cfg.parallel.etp,
                   moe_dispatcher=cfg.parallel.moe_dispatcher,
                   sequence_parallel=cfg.parallel.sequence_parallel,
                   distributed_optimizer=cfg.parallel.distributed_optimizer,
                   micro_batch_size=train.micro_batch_size,
                   num_microbatches=train.global_batch_size // (train.micro_batch_size * dp),
                   precision=train.precision, recompute=train.recompute,
                   peft=cfg.peft if cfg.peft.enabled else None)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (Megatron-Core's expert-data-parallel group:
        world / (etp * ep * pp)), over which the distributed optimizer shards their state."""
        return check_expert_world_size(self.expert_tp, self.ep, self.pp, self.world_size)

    @property
    def sharding(self) -> Sharding:
        return Sharding(tp=self.tp, sequence_parallel=self.sequence_parallel, etp=self.etp)

    @property
    def tokens_per_microbatch(self) -> int:
        """Tokens of one micro-batch on one CP rank."""
        return self.micro_batch_size * self.seq_length // self.cp


@dataclass
class TrainingMemory:
    """Peak bytes on one GPU of the most loaded pipeline stage."""

    stage: int
    parameters: float
    gradients: float
    optimizer: float
    activations: dict[str, float]
    """Kept for backward by the in-flight micro-batches, by layer kind (and input / output)."""
    in_flight: int
    """Micro-batches whose activations the stage holds at once (1F1B)."""
    transient: float
    """On top, at the peak: one layer's working set (recomputed activations included), or the
    loss's 16-bit logits, and the output layer's weight gradient before it joins the fp32
    gradient buffer."""
    experts: dict[str, float] = field(default_factory=dict)
    """The routed experts' share of ``parameters``, ``gradients`` and ``optimizer`` (bytes,
    included in those; empty without MoE layers)."""
    total: float = field(init=False)

    def __post_init__(self):
        self.total = (self.parameters + self.gradients + self.optimizer
                      + sum(self.activations.values()) + self.transient)


KIND_NAMES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def training_memory(cfg: ModelConfig, layout: TrainingLayout, *,
                    kernels: str = "cuda") -> TrainingMemory:
    """Peak memory per GPU of training ``cfg`` with ``layout``: the most loaded stage.
    ``kernels="cpu"`` probes the cpu backend's layers (runs them; TP=1)."""
    return max(stage_memories(cfg, layout, kernels=kernels), key=lambda plan: plan.total)


def stage_memories(cfg: ModelConfig, layout: TrainingLayout, *,
                   kernels: str = "cuda") -> list[TrainingMemory]:
    """Peak memory per GPU of each pipeline stage, first to last."""
    if kernels not in KERNELS:
        raise PlanError(f"kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
    check_memory_modelled(cfg)
    check_experts(cfg, layout)
    per_layer = _per_layer_activations(cfg, layout, kernels)
    return [_stage_memory(cfg, layout, kernels, per_layer, stage) for stage in range(layout.pp)]


def _per_layer_activations(cfg: ModelConfig, layout: TrainingLayout,
                           kernels: str) -> list[LayerActivations]:
    """Each layer's activations at its own sizes (``model.layer_overrides``): one formula or
    probe per distinct set of sizes."""
    by_sizes, per_layer = {}, []
    for index, symbol in enumerate(cfg.layer_pattern.layers):
        sizes = tuple(sorted(cfg.layer_overrides.get(index, {}).items()))
        if sizes not in by_sizes:
            by_sizes[sizes] = _layer_activations(cfg.for_layer(index), layout, kernels)
        per_layer.append(by_sizes[sizes][symbol])
    return per_layer


def _layer_activations(cfg: ModelConfig, layout: TrainingLayout,
                       kernels: str) -> dict[str, LayerActivations]:
    if kernels == "cuda":
        activations = {symbol: cuda_layer_activations(cfg, symbol, precision=layout.precision,
                                                      sharding=layout.sharding)
                       for symbol in set(cfg.layer_pattern.layers)}
        if layout.recompute == "selective" and "*" in activations:
            # The core attention's softmax statistics are recomputed (no s x s scores exist).
            attention = activations["*"]
            activations["*"] = LayerActivations(
                saved=attention.saved - 4 * cfg.num_attention_heads / layout.tp,
                working=attention.working)
        return activations
    if layout.tp != 1:
        raise PlanError(f"cpu-kernel plans probe the layers at tp=1 (asked: tp={layout.tp}): "
                        f"plan kernels='cuda' instead")
    # A CP rank runs its layers on seq/cp tokens; per token they keep what they keep at cp=1
    # (the K/V exchange's buffers are not counted).
    return cpu_layer_activations(cfg, micro_batch_size=layout.micro_batch_size,
                                 seq_length=layout.seq_length // layout.cp,
                                 recompute=layout.recompute)


def check_memory_modelled(cfg: ModelConfig) -> None:
    """PlanError where the memory formulas do not cover the model's layers."""
    if cfg.layer_pattern.counts["H"]:
        raise PlanError("plan counts parallel-heads ('H') layers' parameters but has no "
                        "memory model of their activations and caches: plan the pattern with "
                        "'M' and '*' layers in their place for an estimate")


def check_experts(cfg: ModelConfig, layout: TrainingLayout) -> None:
    """PlanError (ConfigError for the world size) if the experts cannot split as asked."""
    if not cfg.layer_pattern.counts["E"]:
        return
    if cfg.num_moe_experts % layout.ep:
        raise PlanError(f"ep={layout.ep} does not divide the {cfg.num_moe_experts} experts "
                        f"(model.num_moe_experts): choose parallel.ep among their divisors")
    if expert_width(cfg) % layout.expert_tp:
        raise PlanError(f"etp={layout.expert_tp} does not divide the expert width "
                        f"{expert_width(cfg)}: choose parallel.etp among its divisors")
    layout.expert_dp  # noqa: B018  (raises when etp * ep * pp does not divide the world)


def _stage_memory(cfg: ModelConfig, layout: TrainingLayout, kernels: str,
                  per_layer: list[LayerActivations], stage: int) -> TrainingMemory:
    dense, experts = stage_parameters(cfg, layout.tp, layout.pp, ep=layout.ep,
                                      etp=layout.etp)[stage]
    states = _state_bytes_per_parameter(layout, layout.dp * layout.cp)
    expert_states = _state_bytes_per_parameter(layout, layout.expert_dp if experts else 1)
    layers = cfg.layer_pattern.stages(layout.pp)[stage]
    adapters = _stage_adapter_parameters(cfg, layout, layers)
    # Under LoRA only the adapters train (their state sharded as the dense part's).
    trainable, trainable_experts = ((dense, experts) if layout.peft is None else (adapters, 0))
    expert_part = {"parameters": experts * expert_states["weights"],
                   "gradients": trainable_experts * expert_states["gradients"],
                   "optimizer": trainable_experts * expert_states["optimizer"]}
    tokens = layout.tokens_per_microbatch
    in_flight = min(layout.pp - stage, layout.num_microbatches)
    b = 4 if kernels == "cpu" or layout.precision == "fp32" else 2
    full = layout.recompute == "full"
    layer_input = b * layout.sharding.hidden(cfg.hidden_size)
    first = cfg.layer_pattern.stage_offsets(layout.pp)[stage]
    kept = collections.Counter(zip(layers, per_layer[first:first + len(layers)]))
    activations = {}
    for (symbol, layer), count in kept.items():  # layers of a kind at the same sizes together
        activations[KIND_NAMES[symbol]] = activations.get(KIND_NAMES[symbol], 0.0) + (
            in_flight * tokens * count * (layer_input if full else layer.saved))
    # While a layer runs: its working set (and, recomputed, its activations again).
    working = tokens * max(layer.working + (layer.saved if full else 0)
                           for _, layer in kept)
    if stage == 0:
        activations["input"] = in_flight * tokens * INPUT_ACTIVATION_BYTES
    if stage == layout.pp - 1:
        output = tokens * output_activation_bytes(cfg, kernels=kernels,
                                                  precision=layout.precision,
                                                  sharding=layout.sharding)
        activations["output"] = in_flight * output
        # The output's activations are freed before the layers' backward runs; 16-bit logits
        # stay alive beside their fp32 copy while the loss is computed.
        logits = tokens * b * cfg.vocab_size / layout.tp if b == 2 else 0.0
        output_weight_grad = (b * cfg.vocab_size * cfg.hidden_size / layout.tp
                              if layout.peft is None else 0.0)  # frozen under LoRA
        working = max(working - output, logits) + output_weight_grad
    return TrainingMemory(
        stage=stage, parameters=(dense + adapters) * states["weights"] + expert_part["parameters"],
        gradients=trainable * states["gradients"] + expert_part["gradients"],
        optimizer=trainable * states["optimizer"] + expert_part["optimizer"],
        activations=activations, in_flight=in_flight, transient=working,
        experts=expert_part if experts else {})


def _stage_adapter_parameters(cfg: ModelConfig, layout: TrainingLayout, layers: str) -> int:
    """LoRA adapter parameters one TP rank of a stage with ``layers`` holds (0 without)."""
    if layout.peft is None:
        return 0
    per_layer = model_params.lora_layer_parameters(cfg, layout.peft, layout.tp)
    return sum(per_layer.get(symbol, 0) for symbol in layers)


def _state_bytes_per_parameter(layout: TrainingLayout, data_parallel: int) -> dict[str, float]:
    """Bytes per parameter of weights, gradients and optimizer state; the distributed
    optimizer shards the optimizer part over the ``data_parallel`` ranks holding the same
    parameters (dp * cp for the dense part, the expert-data-parallel group for experts)."""
    shards = data_parallel if layout.distributed_optimizer else 1
    if layout.precision == "fp32":
        return {"weights": 4, "gradients": 4, "optimizer": 8 / shards}
    return {"weights": 2, "gradients": 4, "optimizer": 12 / shards}


# ---------------------------------------------------------------------------------------------
# Expert-parallel all-to-all
# ---------------------------------------------------------------------------------------------

@dataclass
class ExpertExchange:
    """Bytes one rank sends through the expert-parallel all-to-all in one optimizer step,
    and receives as many (routing balanced), on the stage with the most MoE layers.
    Megatron-Core's alltoall dispatcher sends each MoE layer's routed hidden rows to their
    experts' ranks (dispatch) and the expert outputs back (combine); the backward sends
    their gradients the other way, the same sizes."""

    per_all_to_all: float
    """One all-to-all of one MoE layer and micro-batch: the routed copies of this rank's
    tokens bound for the other ``ep - 1`` ranks, ``tokens * topk * (ep - 1) / ep`` rows of
    ``h`` 16-bit values (the routing probabilities beside them, 4 bytes a row, left out)."""
    moe_layers: int
    microbatches: int
    dispatch_forward: float
    combine_forward: float
    dispatch_backward: float
    combine_backward: float
    recompute: float
    """Dispatch and combine again when full recompute reruns the layers' forward."""
    total: float = field(init=False)

    def __post_init__(self):
        self.total = (self.dispatch_forward + self.combine_forward + self.dispatch_backward
                      + self.combine_backward + self.recompute)


def expert_exchange(cfg: ModelConfig, layout: TrainingLayout) -> ExpertExchange | None:
    """The all-to-all volume of a step per rank (None without one: no MoE layers, ep 1, or
    the allgather dispatcher, whose all-gather and reduce-scatter are not counted)."""
    moe_layers = max(stage.count("E") for stage in cfg.layer_pattern.stages(layout.pp))
    if not moe_layers or layout.ep == 1 or layout.moe_dispatcher != "alltoall":
        return None
    b = 4 if layout.precision == "fp32" else 2
    rows = (layout.tokens_per_microbatch * layout.sharding.hidden(1) * cfg.moe_router_topk
            * (layout.ep - 1) / layout.ep)
    one = rows * cfg.hidden_size * b
    per_kind = one * moe_layers * layout.num_microbatches
    return ExpertExchange(per_all_to_all=one, moe_layers=moe_layers,
                          microbatches=layout.num_microbatches, dispatch_forward=per_kind,
                          combine_forward=per_kind, dispatch_backward=per_kind,
                          combine_backward=per_kind,
                          recompute=2 * per_kind if layout.recompute == "full" else 0.0)


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepEstimate:
    seconds: float
    mfu: float
    tokens_per_second_per_gpu: float


def step_estimate(cfg: ModelConfig, layout: TrainingLayout, peak_flops: float) -> StepEstimate:
    """Time of one optimizer step and its MFU on GPUs of ``peak_flops`` (dense, per GPU)."""
    from megatron_hybrid.engine import metrics

    flops = metrics.flops_per_token(cfg, layout.seq_length)
    tokens_per_gpu = (layout.dp * layout.num_microbatches * layout.micro_batch_size
                      * layout.seq_length / layout.world_size)
    model_flops = flops["total"] * tokens_per_gpu
    layer_forward = (flops["total"] - flops["logits"]) / metrics.TRAINING_FLOPS_FACTOR
    recompute = {"full": layer_forward, "selective": _core_attention_forward(cfg, layout)}
    hardware_flops = model_flops + recompute.get(layout.recompute, 0.0) * tokens_per_gpu
    bubble = (layout.num_microbatches + layout.pp - 1) / layout.num_microbatches
    seconds = hardware_flops / (peak_flops * KERNEL_EFFICIENCY) * bubble
    return StepEstimate(seconds=seconds, mfu=model_flops / (seconds * peak_flops),
                        tokens_per_second_per_gpu=tokens_per_gpu / seconds)


def _core_attention_forward(cfg: ModelConfig, layout: TrainingLayout) -> float:
    """Forward FLOPs per token of every attention layer's QK^T and AV (causal half)."""
    return (cfg.layer_pattern.counts["*"] * 2 * cfg.num_attention_heads * cfg.kv_channels
            * layout.seq_length)


# ---------------------------------------------------------------------------------------------
# Inference memory
# ---------------------------------------------------------------------------------------------

@dataclass
class InferenceMemory:
    """Bytes to serve ``batch`` sequences of ``context`` tokens on one GPU."""

    context: int
    batch: int
    weights: float
    kv_cache: float
    ssm_state: float
    conv_state: float
    prefill: float
    """Working set of one prefill chunk (the largest layer's, or the last tokens' logits)."""
    total: float = field(init=False)

    def __post_init__(self):
        self.total = (self.weights + self.kv_cache + self.ssm_state + self.conv_state
                      + self.prefill)


def inference_memory(cfg: ModelConfig, *, context: int, batch: int = 1,
                     prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                     dtype_bytes: int = 2) -> InferenceMemory:
    """Weights, caches and prefill working set of serving ``cfg`` (bf16 by default; the SSM
    state is kept in fp32, as Nemotron-H serving does)."""
    check_memory_modelled(cfg)
    w, counts = Widths.of(cfg), cfg.layer_pattern.counts
    kv_per_token = counts["*"] * 2 * w.g * w.d * dtype_bytes
    ssm_state = counts["M"] * w.heads * w.head_dim * w.state * 4
    conv_state = counts["M"] * w.conv_width * (CONV_KERNEL - 1) * dtype_bytes
    chunk_tokens = min(prefill_chunk, context) * batch
    return InferenceMemory(
        context=context, batch=batch, weights=total_parameters(cfg) * dtype_bytes,
        kv_cache=kv_per_token * context * batch, ssm_state=ssm_state * batch,
        conv_state=conv_state * batch,
        prefill=max(chunk_tokens * _prefill_width(cfg, w) * dtype_bytes,
                    batch * cfg.vocab_size * 4))


def _prefill_width(cfg: ModelConfig, w: Widths) -> int:
    """Values per token alive inside the widest layer's forward (input and output included)."""
    widths = {"M": w.in_proj_width + w.conv_width + 2 * w.d_inner,
              "*": (w.a + 2 * w.g) * w.d + w.a * w.d, "-": 2 * w.f,
              "E": 2 * (cfg.moe_ffn_hidden_size or w.f) * cfg.moe_router_topk}
    return 2 * w.h + max(widths[symbol] for symbol in set(cfg.layer_pattern.layers))


def all_attention_counterpart(cfg: ModelConfig) -> ModelConfig:
    """The same-width model with attention in place of every Mamba layer: what the hybrid's KV
    cache is compared against."""
    return cfg.replace(pattern=cfg.pattern.replace("M", "*"))


# ---------------------------------------------------------------------------------------------
# Measurement on the CPU (what the planner is checked against)
# ---------------------------------------------------------------------------------------------

def measure_cpu_peak(fn) -> tuple[object, int]:
    """``(fn(), peak bytes of CPU tensor memory allocated while it ran)``.

    The bytes in use are the CPU allocator's own count, as it reports every allocation and
    free to torch's profiler (``profile_memory=True``): every tensor storage, temporaries
    inside ops included; not the Python heap, not freed memory the C library keeps (which
    RSS would show). Memory allocated before ``fn`` starts is not counted.
    """
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # garbage freed during the run would lower the count it started from
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    allocation = torch._C._profiler._EventType.Allocation
    events, allocations = list(profiler.profiler.kineto_results.experimental_event_tree()), []
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == allocation:
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
    if not allocations:
        return result, 0
    allocations.sort()
    # The allocator's running total spans the process; count from where this run started.
    _, first_total, first_size = allocations[0]
    return result, max(total for _, total, _ in allocations) - (first_total - first_size)


@contextlib.contextmanager
def _rng_state_kept():
    """Seed Megatron-Core's RNG tracker for a probe build; leave the caller's RNGs as they were."""
    import torch

    from megatron_hybrid import mcore

    tracker = mcore.tensor_parallel.get_cuda_rng_tracker()
    cpu_state = torch.get_rng_state()
    tracker_states = tracker.get_states() if tracker.is_initialized() else None
    mcore.tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if tracker_states is None:
            tracker.reset()
        else:
            tracker.set_states(tracker_states)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _remedies(layout: TrainingLayout) -> list[tuple[str, TrainingLayout]]:
    """Changes that lower per-GPU memory with the same global batch, cheapest first: smaller
    micro-batches, full recompute, both, then more GPUs (data parallel shards the optimizer,
    and with experts the expert-data-parallel group grows with it)."""
    tokens = layout.micro_batch_size * layout.num_microbatches
    small = replace(layout, micro_batch_size=1, num_microbatches=tokens)
    remedies = [("train.micro_batch_size=1", small),
                ("train.recompute=full", replace(layout, recompute="full")),
                ("train.micro_batch_size=1 train.recompute=full", replace(small, recompute="full"))]
    for factor in (2, 4, 8):
        if layout.num_microbatches % factor == 0:
            remedies.append((f"--gpus {layout.world_size * factor}",
                             replace(layout, dp=layout.dp * factor,
                                     num_microbatches=layout.num_microbatches // factor)))
    return [(text, changed) for text, changed in remedies if changed != layout]


def what_fits(cfg: ModelConfig, layout: TrainingLayout, gpu: Gpu) -> dict | None:
    """The first of :func:`_remedies` whose plan fits ``gpu`` (None if none does)."""
    for text, changed in _remedies(layout):
        total = training_memory(cfg, changed).total
        if total <= gpu.usable_bytes:
            return {"change": text, "total": total}
    return None



def plan_report(cfg: ModelConfig, layout: TrainingLayout, gpu: Gpu, *, context: int,
                batch: int = 1) -> dict:
    """The plan as plain data: training memory and step time, inference memory, verdicts."""
    training = training_memory(cfg, layout)
    fits = training.total <= gpu.usable_bytes
    exchange = expert_exchange(cfg, layout)
    inference = inference_memory(cfg, context=context, batch=batch)
    peak = gpu.peak_flops(layout.precision)
    step = step_estimate(cfg, layout, peak) if peak else None
    counterpart = inference_memory(all_attention_counterpart(cfg), context=context, batch=batch)
    return {
        "gpu": gpu.device_name, "usable_bytes": gpu.usable_bytes,
        "parameters": total_parameters(cfg), "active_parameters": active_parameters(cfg),
        "layout": asdict(layout),
        "training": {**asdict(training), "fits": fits,
                     "fits_with": None if fits else what_fits(cfg, layout, gpu),
                     "step": asdict(step) if step else None,
                     "all_to_all": asdict(exchange) if exchange else None},
        "inference": {**asdict(inference), "fits": inference.total <= gpu.usable_bytes,
                      "kv_cache_vs_all_attention": inference.kv_cache / counterpart.kv_cache
                      if counterpart.kv_cache else None},
        "basis": BASIS,
    }


def format_report(report: dict) -> str:
    training, inference, layout = report["training"], report["inference"], report["layout"]
    experts = training["experts"]
    active = (f" ({report['active_parameters'] / 1e9:.2f}B active per token, the embedding "
              f"table included)" if experts else "")
    expert_layout = (f" ep {layout['ep']} etp {layout['etp'] or layout['tp']}" if experts
                     else "")
    lines = [f"{report['gpu']}: {_gib(report['usable_bytes'])} usable "
             f"({_gib(RUNTIME_RESERVE_BYTES)} kept for the CUDA runtime); model "
             f"{report['parameters'] / 1e9:.2f}B parameters{active}",
             f"training per GPU ({layout['precision']}, seq {layout['seq_length']:,}, "
             f"tp {layout['tp']} pp {layout['pp']} cp {layout['cp']} dp {layout['dp']}"
             f"{expert_layout}, "
             f"micro-batch {layout['micro_batch_size']} x {layout['num_microbatches']}, "
             f"recompute {layout['recompute']}{_lora(layout['peft'])}; "
             f"stage {training['stage']}):"]
    rows = []
    for part in ("parameters", "gradients", "optimizer"):
        rows.append((part, training[part]))
        if experts:
            rows.append(("  of which routed experts", experts[part]))
    rows += [(f"activations {kind}", value) for kind, value in training["activations"].items()]
    rows += [("working set at the peak", training["transient"])]
    lines += [f"  {name:<30}{_gib(value):>12}" for name, value in rows]
    lines.append(f"  {'total':<30}{_gib(training['total']):>12}  {_verdict(training['fits'])}"
                 f" ({training['in_flight']} micro-batches in flight)")
    if training["fits_with"]:
        lines.append(f"  fits with {training['fits_with']['change']}: "
                     f"{_gib(training['fits_with']['total'])}")
    if training["step"]:
        step = training["step"]
        lines.append(f"  step ~{step['seconds']:.3g} s, MFU ~{step['mfu']:.0%}, "
                     f"{step['tokens_per_second_per_gpu']:,.0f} tokens/s/GPU")
    if training["all_to_all"]:
        lines.append(_all_to_all_line(training["all_to_all"], layout["ep"]))
    ratio = inference["kv_cache_vs_all_attention"]
    lines += [f"inference (bf16, context {inference['context']:,} x batch {inference['batch']}):"]
    rows = [("weights", inference["weights"]), ("KV cache", inference["kv_cache"]),
            ("SSM state (fp32)", inference["ssm_state"]), ("conv state", inference["conv_state"]),
            (f"prefill ({DEFAULT_PREFILL_CHUNK:,}-token chunks)", inference["prefill"])]
    lines += [f"  {name:<30}{_gib(value):>12}" for name, value in rows]
    lines.append(f"  {'total':<30}{_gib(inference['total']):>12}  {_verdict(inference['fits'])}")
    if ratio is not None:
        lines.append(f"  KV cache is {ratio:.1%} of a same-width all-attention model's")
    lines.append("figures:")
    lines += [f"  {name:<12}{basis}" for name, basis in report["basis"].items()]
    return "\n".join(lines)


def _all_to_all_line(exchange: dict, ep: int) -> str:
    kinds = 6 if exchange["recompute"] else 4
    return (f"  expert all-to-all (ep {ep}, routing balanced): {_gib(exchange['total'])} per "
            f"step sent and as much received by each GPU = {exchange['moe_layers']} MoE layers"
            f" x {exchange['microbatches']} micro-batches x {kinds} (dispatch and combine, "
            f"forward and backward{', recomputed forward' if kinds == 6 else ''}) x "
            f"{exchange['per_all_to_all'] / MIB:.1f} MiB")


def _lora(peft: dict | None) -> str:
    return "" if peft is None else f", LoRA r={peft['rank']} (the base frozen)"


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def _verdict(fits: bool) -> str:
    return "fits" if fits else "does NOT fit"


# ---------------------------------------------------------------------------------------------
# Quantized serving (the formats of megatron_hybrid.quantization)
# ---------------------------------------------------------------------------------------------

def quantized_parameters(cfg: ModelConfig, name: str) -> int:
    """Parameters format ``name`` stores quantized: the Mamba ``in_proj``/``out_proj`` (but of
    the Mamba layers it keeps in bf16), the MLP linears and the experts (routed and shared);
    attention, embeddings, the output layer, conv1d and norms stay bf16."""
    from megatron_hybrid.quantization.formats import bf16_mamba_layers

    w, layers = Widths.of(cfg), cfg.layer_pattern.layers
    kept, total = set(bf16_mamba_layers(layers, name)), 0
    for index, symbol in enumerate(layers):
        if symbol == "M" and index not in kept:
            total += w.h * w.in_proj_width + w.d_inner * w.h
        elif symbol in "-E":
            sharded, _, routed = layer_parameters(cfg, symbol)
            total += sharded + routed
    return total


def quantized_inference_memory(cfg: ModelConfig, name: str, *, context: int,
                               batch: int = 1) -> InferenceMemory:
    """:func:`inference_memory` with the weights of format ``name`` ("bf16": unquantized);
    the KV cache stays bf16."""
    from megatron_hybrid.quantization.formats import BF16_BYTES, weight_bytes

    memory = inference_memory(cfg, context=context, batch=batch)
    if name == "bf16":
        return memory
    saved = quantized_parameters(cfg, name) * (BF16_BYTES - weight_bytes(name))
    return replace(memory, weights=memory.weights - saved)
