"""torchrun worker: cached greedy decode of a few prompts on Megatron-Core's dynamic engine
under one layout, ``decode_parity.py OUT CHECKPOINT TP PP``.

With TP = PP = 1 it first creates the weights (seeded) and saves them to CHECKPOINT; the other
layouts load them. Rank 0 writes, with ``torch.save`` to OUT, each prompt's generated tokens
and their log probabilities (``return_log_probs``: from the full, gathered logits of each step).
"""

import sys
from pathlib import Path

import torch

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported

from megatron_hybrid.checkpoint.dist_checkpoint import load_weights, save_weights  # noqa: E402
from megatron_hybrid.inference import engine as engines  # noqa: E402
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.model.config import ModelConfig  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402
from megatron_hybrid import mcore  # noqa: E402

MODEL = ModelConfig(pattern="M*-M-M-|M*-*-", hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, num_query_groups=2, kv_channels=8, mamba_num_heads=4,
                    mamba_head_dim=8, mamba_state_dim=8, mamba_num_groups=2, vocab_size=1024,
                    seq_length=128, mamba_chunk_size=16)
"""Stages of 7 and 5 layers (uneven), with one and two attention layers."""
PROMPTS = [list(range(5, 45)), list(range(300, 311)), [17, 3, 900]]
NEW_TOKENS = 6


def main(out: str, checkpoint: str, tp: int, pp: int) -> None:
    layout = process_groups.ParallelDims(tp=tp, pp=pp, world_size=tp * pp)
    process_groups.init_distributed(layout, backend="cpu")
    process_groups.seed_everything(0)
    pattern = MODEL.pattern if pp > 1 else MODEL.pattern.replace("|", "")
    model = build_model(ModelConfig(**{**MODEL.__dict__, "pattern": pattern}),
                        ModelLayout(tp=tp, pp=pp), backend="cpu")
    if tp * pp == 1:
        save_weights([model], checkpoint)
    else:
        load_weights([model], checkpoint)
    engine = engines.dynamic_engine(model, max_requests=len(PROMPTS), max_sequence_length=64)
    sampling = mcore.SamplingParams(top_k=1, num_tokens_to_generate=NEW_TOKENS,
                                    termination_id=-1, return_log_probs=True,
                                    skip_prompt_log_probs=True)
    records = [record.merge() for record in engine.generate(PROMPTS, sampling)]
    if torch.distributed.get_rank() == 0:
        torch.save({"tokens": [list(map(int, r.generated_tokens)) for r in records],
                    "log_probs": [list(map(float, r.generated_log_probs)) for r in records]},
                   out)
    process_groups.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
