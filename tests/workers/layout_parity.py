"""torchrun worker: train the same weights under several parallel layouts in one launch.

Arguments: the results file, the model's pattern and the layouts to run (comma-separated
names of :data:`LAYOUTS`). The first layout, ``tp1`` (TP=PP=CP=EP=1), writes the checkpoint
every layout loads; each trains a few steps on the same global batches. Rank 0 writes, with
``torch.save`` to argv[1]:

- ``runs``: {layout: {"loss": [...], "grad_norm": [...]}} per step; the :data:`RESHARDED`
  layouts' also have ``logits``, of their trained weights for a fixed batch;
- ``gradients``: {layout: {parameter: gradient}}, the first step's reduced gradient of every
  parameter (before clipping), in full, under the TP=1 model's names and shapes;
- ``resharded_logits``: {layout: logits} for the :data:`RESHARDED` layouts run, of the same
  trained weights read into a TP=1, EP=1 model;
- ``cp_mismatch`` (with ``MUTANT``): the error of a model whose TransformerConfig says CP=1
  inside CP=2 groups.

A layout's gradients reach TP=1 names and shapes through the project's reshardable
checkpoints: written as the weights of that layout's model, read into a TP=1 model. The
control layout ``MUTANT`` is CP=2 with a deliberately wrong attention: it does not gather
K/V over the CP group, so each rank attends over its own two chunks only. Grouping layouts
in one launch pays the import cost once per rank.
"""

import contextlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_hybrid import backends

MUTANT = "cp2_without_kv_gather"


class Layout(NamedTuple):
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    distopt: bool = False
    ep: int = 1
    dispatcher: str = "alltoall"


LAYOUTS = {
    "tp1": Layout(),
    "tp2": Layout(tp=2),
    "pp2": Layout(pp=2),
    "tp2pp2": Layout(tp=2, pp=2),
    "tp2sp": Layout(tp=2, sp=True),
    "tp2sp_distopt": Layout(tp=2, sp=True, distopt=True),
    "cp2": Layout(cp=2),
    "tp2cp2": Layout(tp=2, cp=2),
    "tp2cp2sp": Layout(tp=2, cp=2, sp=True),
    "pp2cp2": Layout(pp=2, cp=2),
    # More TP ranks than the model's 2 KV groups: each attends with a replica of one group.
    "tp4sp": Layout(tp=4, sp=True),
    "distopt_overlap": Layout(distopt=True),
    MUTANT: Layout(cp=2),
    # Expert parallel (an E pattern): the experts split over 2 or 4 ranks; expert tensor
    # parallel is tp (Megatron-Core's default).
    "ep2": Layout(ep=2),
    "ep2_allgather": Layout(ep=2, dispatcher="allgather"),
    "ep4": Layout(ep=4),
    "ep2tp2sp": Layout(ep=2, tp=2, sp=True),
    "ep2pp2_distopt": Layout(ep=2, pp=2, distopt=True),
}
RESHARDED = ("ep2", "tp4sp")
"""The layouts whose trained weights are read back at TP=1, EP=1 and must give their logits."""
GPU_DDP = {"distopt_overlap"}
"""Layouts wrapped with the DDP settings of the cuda backend: the gradient reduce overlapped
with the backward (once per step, after the last micro-batch: ``no_sync``) and the weight
all-gather deferred to the next forward (``sync_params`` before the weights are read)."""
STEPS = 3
GLOBAL_BATCH = 4
MICRO_BATCH = 1


def global_batches(vocab_size: int, seq_length: int):
    generator = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        yield torch.randint(0, vocab_size, (GLOBAL_BATCH, seq_length + 1), generator=generator)


def microbatches(tokens: torch.Tensor, dp_rank: int, dp_size: int):
    local = tokens.chunk(dp_size)[dp_rank]
    for sample in local.split(MICRO_BATCH):
        yield {"tokens": sample[:, :-1].contiguous(), "labels": sample[:, 1:].contiguous(),
               "loss_mask": torch.ones_like(sample[:, 1:], dtype=torch.float)}


class FirstStepGradients:
    """The layout's optimizer, keeping a copy of every parameter's gradient at its first step
    (reduced over DP and CP by then, not yet clipped)."""

    def __init__(self, optimizer, ddp_model):
        self.optimizer = optimizer
        self.ddp_model = ddp_model
        self.gradients: dict[str, torch.Tensor] | None = None

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self):
        if self.gradients is None:
            complete_sharded_gradients(self.ddp_model)
            self.gradients = {name: param.main_grad.detach().clone()
                              for name, param in self.ddp_model.module.named_parameters()
                              if param.requires_grad}  # a frozen (LoRA base) one has none
        return self.optimizer.step()


def complete_sharded_gradients(ddp_model) -> None:
    """Under the distributed optimizer each DP rank holds the reduced gradients of its shard
    of every bucket only: all-gather the shards so every parameter's ``main_grad`` is whole
    (the optimizer reads its own shard alone, which this leaves as it was)."""
    if not ddp_model.ddp_config.use_distributed_optimizer:
        return
    for bucket_group in ddp_model.bucket_groups:
        group = bucket_group.intra_distributed_optimizer_instance_group
        shards = bucket_group.intra_distributed_optimizer_instance_size
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        for bucket in bucket_group.buckets:
            local = bucket.grad_data.chunk(shards)[rank].clone()
            dist.all_gather_into_tensor(bucket.grad_data, local, group=group)


@contextlib.contextmanager
def attention_without_kv_gather():
    """Within: the cpu backend's CP attention runs over a one-rank group of its own, so each
    rank attends over its local chunks alone (the bug of forgetting the K/V all-gather)."""
    from megatron_hybrid.parallel import context_parallel

    alone, _ = dist.new_subgroups(group_size=1)
    correct = context_parallel.attention

    def local_only(query, key, value, *, group, **kwargs):
        return correct(query, key, value, group=alone, **kwargs)

    context_parallel.attention = local_only
    try:
        yield
    finally:
        context_parallel.attention = correct


def run_layout(model_cfg, name, work_dir: Path, world_size):
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups

    layout = LAYOUTS[name]
    dims = process_groups.ParallelDims(tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep,
                                       world_size=world_size)
    process_groups.init_distributed(dims, backend="cpu")
    process_groups.seed_everything(0)
    model = build_model(model_cfg, ModelLayout(
        tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep, moe_dispatcher=layout.dispatcher,
        sequence_parallel=layout.sp), backend="cpu")
    if name == "tp1":
        dist_checkpoint.save_weights([model], work_dir / "initial_weights")
    dist_checkpoint.load_weights([model], work_dir / "initial_weights")
    ddp_backend = "cuda" if name in GPU_DDP else "cpu"
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=layout.distopt,
                                     backend=ddp_backend)]
    optimizer = FirstStepGradients(training_step.build_optimizer(
        chunks, training_step.OptimizerSettings(lr=1e-2, use_distributed_optimizer=layout.distopt)),
        chunks[0])
    trained = work_dir / f"trained_{name}" if name in RESHARDED else None
    run = train_and_save_gradients(chunks, optimizer, model_cfg, dims,
                                   work_dir / f"gradients_{name}", trained_weights=trained)
    if trained is not None:  # the trained weights, read back at this layout
        dist_checkpoint.load_weights([model], trained)
        run["logits"] = logits(model, model_cfg)
    mcore.parallel_state.destroy_model_parallel()
    return run


def logits(model, model_cfg) -> torch.Tensor:
    """The model's logits (one pipeline stage, the vocabulary gathered over TP) for a fixed
    batch."""
    from megatron_hybrid import mcore

    tokens = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length),
                           generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        local = model(tokens, None, None)
        return mcore.tensor_parallel.gather_from_tensor_model_parallel_region(local).clone()


def train_and_save_gradients(chunks, optimizer: FirstStepGradients, model_cfg, dims,
                             path: Path, *, trained_weights: Path | None = None) -> dict:
    """Train ``STEPS`` steps on the global batches (then save the trained weights to
    ``trained_weights`` if given); save the first step's gradients as the model's weights (a
    frozen parameter keeps its own) to ``path``. Returns the per-step loss and grad norm."""
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.engine import training_step

    dp_rank = mcore.parallel_state.get_data_parallel_rank()
    losses, norms = [], []
    for tokens in global_batches(model_cfg.vocab_size, model_cfg.seq_length):
        result = training_step.train_step(
            chunks, optimizer, microbatches(tokens, dp_rank, dims.dp),
            num_microbatches=GLOBAL_BATCH // (MICRO_BATCH * dims.dp),
            micro_batch_size=MICRO_BATCH, seq_length=model_cfg.seq_length)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    training_step.sync_params(chunks)
    model = dist_checkpoint.unwrap(chunks[0])
    if trained_weights is not None:
        dist_checkpoint.save_weights([model], trained_weights)
    with torch.no_grad():  # the gradients, written as this layout's weights
        for param_name, param in model.named_parameters():
            if param_name in optimizer.gradients:
                param.copy_(optimizer.gradients[param_name])
    dist_checkpoint.save_weights([model], path)
    return {"loss": losses, "grad_norm": norms}


def read_at_tp1(model_cfg, names, work_dir: Path, world_size) -> dict:
    """Every layout's saved gradients, read into a TP=1 model ({layout: {name: tensor}}), and
    the logits of the :data:`RESHARDED` layouts' trained weights read the same way."""
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(world_size=world_size), backend="cpu")
    model = build_model(model_cfg, ModelLayout(), backend="cpu")
    gradients = {}
    for name in names:
        dist_checkpoint.load_weights([model], work_dir / f"gradients_{name}")
        gradients[name] = {param_name: param.detach().clone()
                           for param_name, param in model.named_parameters()}
    results = {"gradients": gradients, "resharded_logits": {}}
    for name in set(RESHARDED) & set(names):
        dist_checkpoint.load_weights([model], work_dir / f"trained_{name}")
        results["resharded_logits"][name] = logits(model, model_cfg)
    mcore.parallel_state.destroy_model_parallel()
    return results


def cp_mismatch_error(model_cfg, world_size) -> str:
    """The error of building a model told CP=1 while the process groups have CP=2."""
    from megatron_hybrid import mcore
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups
    from megatron_hybrid.parallel.context_parallel import ContextParallelError

    process_groups.init_distributed(process_groups.ParallelDims(cp=2, world_size=world_size), backend="cpu")
    try:
        build_model(model_cfg, ModelLayout(cp=1), backend="cpu")
    except ContextParallelError as err:
        return str(err)
    finally:
        mcore.parallel_state.destroy_model_parallel()
    return "no error"


def model_config(pattern: str, tp: int = 2):
    """The tiny model the parity workers train (4 experts, top 2, where it has E layers), its
    Mamba groups split by ``tp`` (the widest layout's, at least 2) ranks."""
    from megatron_hybrid.model.config import ModelConfig

    experts = {"num_moe_experts": 4, "moe_router_topk": 2} if "E" in pattern else {}
    return ModelConfig(
        pattern=pattern, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=max(2, tp), vocab_size=64, seq_length=32,
        mamba_chunk_size=16, **experts)


def main():
    backends.install("cpu")
    out_path, pattern, layouts = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    names = ["tp1", *layouts]
    model_cfg = model_config(pattern, max(LAYOUTS[name].tp for name in names))
    world_size = int(os.environ["WORLD_SIZE"])
    work_dir = out_path.parent
    runs = {}
    for name in names:
        with attention_without_kv_gather() if name == MUTANT else contextlib.nullcontext():
            runs[name] = run_layout(model_cfg, name, work_dir, world_size)
    results = {"runs": runs, **read_at_tp1(model_cfg, names, work_dir, world_size)}
    if MUTANT in names:
        results["cp_mismatch"] = cp_mismatch_error(model_cfg, world_size)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
