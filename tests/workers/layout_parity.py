"""torchrun worker: train the same weights under several parallel layouts in one launch.

Every layout loads the checkpoint written by the first (TP=1, PP=1, CP=1) layout and trains a
few steps on the same global batches; rank 0 writes {layout: {"loss": [...], "grad_norm":
[...]}} as JSON to argv[1], plus under "cp_mismatch" the error of a model whose
TransformerConfig says CP=1 inside CP=2 process groups. Grouping layouts in one launch pays
the import cost once per rank.
"""

import json
import os
import sys

import torch

from megatron_hybrid import backends

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
    "tp2_own_init": (2, 1, 1, False, False),  # control: its own random weights, not the checkpoint
}
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


def run_layout(model_cfg, name, checkpoint_dir, world_size):
    from megatron_hybrid import checkpoint, engine, mcore, parallel
    from megatron_hybrid.model import ModelLayout, build_model

    tp, pp, cp, sp, distopt = LAYOUTS[name]
    dims = parallel.ParallelDims(tp=tp, pp=pp, cp=cp, world_size=world_size)
    parallel.init_distributed(dims, backend="cpu")
    parallel.seed_everything(1 if name.endswith("own_init") else 0)
    layout = ModelLayout(tp=tp, pp=pp, cp=cp, sequence_parallel=sp)
    model = build_model(model_cfg, layout, backend="cpu")
    if name == "tp1":
        checkpoint.save_weights([model], checkpoint_dir)
    if not name.endswith("own_init"):
        checkpoint.load_weights([model], checkpoint_dir)
    chunks = [engine.wrap_ddp(model, use_distributed_optimizer=distopt)]
    optimizer = engine.build_optimizer(
        chunks, engine.OptimizerSettings(lr=1e-2, use_distributed_optimizer=distopt))
    dp_rank = mcore.parallel_state.get_data_parallel_rank()
    losses, norms = [], []
    for tokens in global_batches(model_cfg.vocab_size, model_cfg.seq_length):
        result = engine.train_step(
            chunks, optimizer, microbatches(tokens, dp_rank, dims.dp),
            num_microbatches=GLOBAL_BATCH // (MICRO_BATCH * dims.dp),
            micro_batch_size=MICRO_BATCH, seq_length=model_cfg.seq_length)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    mcore.parallel_state.destroy_model_parallel()
    return {"loss": losses, "grad_norm": norms}


def cp_mismatch_error(model_cfg, world_size) -> str:
    """The error of building a model told CP=1 while the process groups have CP=2."""
    from megatron_hybrid import mcore, parallel
    from megatron_hybrid.context_parallel import ContextParallelError
    from megatron_hybrid.model import ModelLayout, build_model

    parallel.init_distributed(parallel.ParallelDims(cp=2, world_size=world_size), backend="cpu")
    try:
        build_model(model_cfg, ModelLayout(cp=1), backend="cpu")
    except ContextParallelError as err:
        return str(err)
    finally:
        mcore.parallel_state.destroy_model_parallel()
    return "no error"


def main():
    from megatron_hybrid.config import ModelConfig

    backends.install("cpu")
    out_path, pattern = sys.argv[1], sys.argv[2]
    model_cfg = ModelConfig(
        pattern=pattern, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=2, vocab_size=64, seq_length=32,
        mamba_chunk_size=16)
    world_size = int(os.environ["WORLD_SIZE"])
    checkpoint_dir = os.path.join(os.path.dirname(out_path), "initial_weights")
    results = {name: run_layout(model_cfg, name, checkpoint_dir, world_size)
               for name in LAYOUTS}
    results["cp_mismatch"] = cp_mismatch_error(model_cfg, world_size)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
