"""torchrun worker: train the same weights under several parallel layouts in one launch.

Every layout loads the checkpoint written by the first (TP=1, PP=1, CP=1) layout and trains a
few steps on the same global batches. Rank 0 writes, with ``torch.save`` to argv[1]:

- ``runs``: {layout: {"loss": [...], "grad_norm": [...]}} per step;
- ``gradients``: {layout: {parameter: gradient}}, the first step's reduced gradient of every
  parameter (before clipping), in full, under the TP=1 model's names and shapes;
- ``cp_mismatch``: the error of a model whose TransformerConfig says CP=1 inside CP=2 groups.

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

import torch
import torch.distributed as dist

from megatron_hybrid import backends

MUTANT = "cp2_without_kv_gather"
LAYOUTS = {
    # name: (tp, pp, cp, sequence_parallel, distributed_optimizer)
    "tp1": (1, 1, 1, False, False),
    "tp2": (2, 1, 1, False, False),
    "pp2": (1, 2, 1, False, False),
    "tp2pp2": (2, 2, 1, False, False),
    "tp2sp": (2, 1, 1, True, False),
    "tp2sp_distopt": (2, 1, 1, True, True),
    "cp2": (1, 1, 2, False, False),
    "tp2cp2": (2, 1, 2, False, False),
    "tp2cp2sp": (2, 1, 2, True, False),
    "pp2cp2": (1, 2, 2, False, False),
    "distopt_overlap": (1, 1, 1, False, True),
    MUTANT: (1, 1, 2, False, False),
}
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

    tp, pp, cp, sp, distopt = LAYOUTS[name]
    dims = process_groups.ParallelDims(tp=tp, pp=pp, cp=cp, world_size=world_size)
    process_groups.init_distributed(dims, backend="cpu")
    process_groups.seed_everything(0)
    model = build_model(model_cfg, ModelLayout(tp=tp, pp=pp, cp=cp, sequence_parallel=sp),
                        backend="cpu")
    if name == "tp1":
        dist_checkpoint.save_weights([model], work_dir / "initial_weights")
    dist_checkpoint.load_weights([model], work_dir / "initial_weights")
    ddp_backend = "cuda" if name in GPU_DDP else "cpu"
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=distopt,
                                     backend=ddp_backend)]
    optimizer = FirstStepGradients(training_step.build_optimizer(
        chunks, training_step.OptimizerSettings(lr=1e-2, use_distributed_optimizer=distopt)), chunks[0])
    run = train_and_save_gradients(chunks, optimizer, model_cfg, dims,
                                   work_dir / f"gradients_{name}")
    mcore.parallel_state.destroy_model_parallel()
    return run


def train_and_save_gradients(chunks, optimizer: FirstStepGradients, model_cfg, dims,
                             path: Path) -> dict:
    """Train ``STEPS`` steps on the global batches; save the first step's gradients as the
    model's weights (a frozen parameter keeps its own) to ``path``. Returns the per-step
    loss and grad norm."""
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
    with torch.no_grad():  # the gradients, written as this layout's weights
        for param_name, param in model.named_parameters():
            if param_name in optimizer.gradients:
                param.copy_(optimizer.gradients[param_name])
    dist_checkpoint.save_weights([model], path)
    return {"loss": losses, "grad_norm": norms}


def gradients_at_tp1(model_cfg, work_dir: Path, world_size) -> dict[str, dict]:
    """Every layout's saved gradients, read into a TP=1 model: {layout: {name: tensor}}."""
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(world_size=world_size), backend="cpu")
    model = build_model(model_cfg, ModelLayout(), backend="cpu")
    gradients = {}
    for name in LAYOUTS:
        dist_checkpoint.load_weights([model], work_dir / f"gradients_{name}")
        gradients[name] = {param_name: param.detach().clone()
                           for param_name, param in model.named_parameters()}
    mcore.parallel_state.destroy_model_parallel()
    return gradients


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


def model_config(pattern: str):
    """The tiny model the parity workers train."""
    from megatron_hybrid.model.config import ModelConfig

    return ModelConfig(
        pattern=pattern, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=2, vocab_size=64, seq_length=32,
        mamba_chunk_size=16)


def main():
    backends.install("cpu")
    out_path, pattern = Path(sys.argv[1]), sys.argv[2]
    model_cfg = model_config(pattern)
    world_size = int(os.environ["WORLD_SIZE"])
    work_dir = out_path.parent
    runs = {}
    for name in LAYOUTS:
        with attention_without_kv_gather() if name == MUTANT else contextlib.nullcontext():
            runs[name] = run_layout(model_cfg, name, work_dir, world_size)
    results = {"runs": runs, "gradients": gradients_at_tp1(model_cfg, work_dir, world_size),
               "cp_mismatch": cp_mismatch_error(model_cfg, world_size)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
