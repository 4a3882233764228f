"""Greedy decoding with a Megatron-Core model of one rank (tp = pp = cp = 1).

No KV cache or SSM state is kept between steps: every step re-runs the forward over the
sequences so far. Several prompts decode together as one packed row (THD
``packed_seq_params``: each sequence is its own document, so none sees another), which makes a
step one forward whatever the number of prompts. Quadratic in the length, and enough for
measuring short answers (the SFT task metric) on tiny models.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
from megatron_hybrid.engine import training_step


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


def generate(model, prompt: list[int], max_new_tokens: int, *, stop: Collection[int] = ()
             ) -> list[int]:
    """The greedy continuation of ``prompt`` (token ids): at most ``max_new_tokens`` ids,
    ending at the first id in ``stop`` (included) when one comes."""
    return generate_batch(model, [prompt], max_new_tokens, stop=stop)[0]


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, *,
                   stop: Collection[int] = ()) -> list[list[int]]:
    """The greedy continuation of each prompt, as :func:`generate` gives it alone; a sequence
    that has stopped leaves the packed row."""
    check_single_rank(model)
    module = unwrap(model)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    new: list[list[int]] = [[] for _ in prompts]
    running = [index for index, prompt in enumerate(prompts) if max_new_tokens > 0]
    try:
        while running:
            rows = [list(prompts[index]) + new[index] for index in running]
            tokens = torch.tensor([[token for row in rows for token in row]], device=device)
            positions = torch.cat([torch.arange(len(row), device=device) for row in rows])
            logits = module(tokens, None, None,
                            packed_seq_params=training_step.packed_seq_params(positions))
            last = torch.tensor([len(row) for row in rows], device=device).cumsum(0) - 1
            for index, next_id in zip(running, logits[0, last].argmax(-1).tolist()):
                new[index].append(next_id)
            running = [index for index in running
                       if new[index][-1] not in stop and len(new[index]) < max_new_tokens]
    finally:
        module.train(was_training)
    return new
