"""torchrun worker: load checkpoints at given tensor-parallel sizes and measure one loss.

Usage: prune_reload.py OUT.json NAME=CHECKPOINT_DIR:TP [...]. Each checkpoint's model comes
from its meta.json; every entry sees the same random token batches. Rank 0 writes
{"loss": {NAME: loss}, "supported_hparams": [ModelOpt mcore_minitron's prunable sizes]}.
"""

import json
import os
import sys

import torch

from megatron_hybrid import backends

SAMPLES = 4
SEQ_LENGTH = 64


def batches(vocab_size: int, dp_rank: int, dp_size: int):
    tokens = torch.randint(0, vocab_size, (SAMPLES, SEQ_LENGTH + 1),
                           generator=torch.Generator().manual_seed(7))
    for sample in tokens.chunk(dp_size)[dp_rank].split(1):
        yield {"tokens": sample[:, :-1].contiguous(), "labels": sample[:, 1:].contiguous(),
               "loss_mask": torch.ones_like(sample[:, 1:], dtype=torch.float)}


def loss_of(directory: str, tp: int, world_size: int) -> float:
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.model.config import ModelConfig
    from megatron_hybrid.parallel import process_groups

    model_cfg = ModelConfig(**dist_checkpoint.read_meta(directory)["model"])
    dims = process_groups.ParallelDims(tp=tp, world_size=world_size)
    process_groups.init_distributed(dims, backend="cpu")
    process_groups.seed_everything(0)
    model = build_model(model_cfg, ModelLayout(tp=tp), backend="cpu")
    dist_checkpoint.load_weights([model], directory)
    dp_rank = mcore.parallel_state.get_data_parallel_rank()
    loss = training_step.eval_loss([model], batches(model_cfg.vocab_size, dp_rank, dims.dp),
                            num_microbatches=SAMPLES // dims.dp, micro_batch_size=1,
                            seq_length=SEQ_LENGTH)
    mcore.parallel_state.destroy_model_parallel()
    return loss


def main():
    backends.install("cpu")
    from modelopt.torch.prune.plugins.mcore_minitron import SUPPORTED_HPARAMS

    out_path, entries = sys.argv[1], sys.argv[2:]
    world_size = int(os.environ["WORLD_SIZE"])
    losses = {}
    for entry in entries:
        name, _, spec = entry.partition("=")
        directory, _, tp = spec.rpartition(":")
        losses[name] = loss_of(directory, int(tp), world_size)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump({"loss": losses, "supported_hparams": sorted(SUPPORTED_HPARAMS)}, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
