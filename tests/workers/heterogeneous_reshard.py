"""torchrun worker (2 ranks): a model with per-layer sizes (``model.layer_overrides``) saved
at TP=1 and loaded at TP=2 and at PP=2.

Argument: the results file. Rank 0 writes with ``torch.save``: ``logits`` {"tp1", "tp2"} for a
fixed batch (the vocabulary gathered over TP), ``pp2_layers_equal`` (every layer of each PP=2
stage, by global number, has the TP=1 model's tensors) and ``pp2_numbers`` (the global layer
numbers each stage built).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid import backends


def model_config():
    """A tiny model whose every layer kind has a layer with its own sizes, TP=2-divisible."""
    from megatron_hybrid.model.config import ModelConfig

    return ModelConfig(
        pattern="M-*M|-*M-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
        mamba_state_dim=8, mamba_num_groups=2, vocab_size=64, seq_length=32,
        mamba_chunk_size=16,
        layer_overrides={1: {"ffn_hidden_size": 32}, 2: {"num_attention_heads": 2},
                         3: {"mamba_num_heads": 2}, 7: {"ffn_hidden_size": 96},
                         5: {"num_attention_heads": 8, "num_query_groups": 4},
                         6: {"mamba_num_heads": 8}})


def built(model_cfg, tp: int, pp: int):
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(
        tp=tp, pp=pp, world_size=int(os.environ["WORLD_SIZE"])), backend="cpu")
    process_groups.seed_everything(0)
    return build_model(model_cfg, ModelLayout(tp=tp, pp=pp), backend="cpu")


def logits(model, model_cfg) -> torch.Tensor:
    from megatron_hybrid import mcore

    tokens = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length),
                           generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return mcore.tensor_parallel.gather_from_tensor_model_parallel_region(
            model(tokens, None, None)).clone()


def layer_tensors(model) -> dict:
    return {layer.layer_number: layer.state_dict() for layer in model.decoder.layers}


def main():
    backends.install("cpu")
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint

    out_path, model_cfg = Path(sys.argv[1]), model_config()
    weights = out_path.parent / "weights"
    model = built(model_cfg, tp=1, pp=1)
    dist_checkpoint.save_weights([model], weights)
    results = {"logits": {"tp1": logits(model, model_cfg)}}
    reference = layer_tensors(model)
    mcore.parallel_state.destroy_model_parallel()

    model = built(model_cfg, tp=2, pp=1)
    dist_checkpoint.load_weights([model], weights)
    results["logits"]["tp2"] = logits(model, model_cfg)
    mcore.parallel_state.destroy_model_parallel()

    model = built(model_cfg, tp=1, pp=2)
    dist_checkpoint.load_weights([model], weights)
    stage = layer_tensors(model)
    equal = all(torch.equal(tensor, reference[number][name])
                for number, tensors in stage.items() for name, tensor in tensors.items()
                if not name.endswith("_extra_state"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sorted(stage), equal))
    results["pp2_numbers"] = [numbers for numbers, _ in gathered]
    results["pp2_layers_equal"] = all(ok for _, ok in gathered)
    mcore.parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
