"""Greedy decoding with a Megatron-Core model of one rank (tp = pp = cp = 1).

No KV cache or SSM state is kept between steps: every step re-runs the forward over the whole
sequence so far. That is quadratic in the length, and enough for measuring short answers (the
reasoning toggle of SFT) on tiny models.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from megatron_hybrid.checkpoint import unwrap


def check_single_rank(model) -> None:
    """Refuse a model split over ranks: its logits (vocabulary-parallel under TP) or its
    layers (PP, CP) are not all here."""
    config = unwrap(model).config
    sizes = {"tp": config.tensor_model_parallel_size, "pp": config.pipeline_model_parallel_size,
             "cp": config.context_parallel_size}
    split = {name: size for name, size in sizes.items() if size != 1}
    if split:
        layout = ", ".join(f"{name}={size}" for name, size in split.items())
        raise ValueError(f"generate needs the whole model on one rank, got {layout}: decode "
                         f"with parallel.tp=1, parallel.pp=1, parallel.cp=1")


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, *, stop: Collection[int] = ()
             ) -> list[int]:
    """The greedy continuation of ``prompt`` (token ids): at most ``max_new_tokens`` ids,
    ending at the first id in ``stop`` (included) when one comes."""
    check_single_rank(model)
    module = unwrap(model)
    was_training = module.training
    module.eval()
    tokens = torch.tensor([prompt], dtype=torch.long,
                          device=next(module.parameters()).device)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = module(tokens, None, None)  # [1, s, vocab]
            next_id = int(logits[0, -1].argmax())
            new.append(next_id)
            if next_id in stop:
                break
            tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    finally:
        module.train(was_training)
    return new
