"""torchrun worker: the GRPO update of one fixed batch of rollouts under several layouts.

Arguments: the results file and the model's pattern. Each layout (:data:`LAYOUTS`, on 2 ranks:
``tp1`` is then DP=2) loads the weights ``tp1`` saves, recomputes the rollouts' per-token
log-probabilities (``grpo_objective.token_logps``, forward only through the pipeline schedules) and
takes 3 GRPO steps on them (the clipped objective with a KL penalty to a reference drawn
near the policy; after the first step the batch is off-policy, so the clip acts). Rank 0
writes, with ``torch.save`` to argv[1]:

- ``runs``: {layout: {"loss": [...], "grad_norm": [...], "old_logp": [n, s]}};
- ``gradients``: {layout: {parameter: gradient}}, the first step's, under TP=1 names and
  shapes (through a checkpoint, as ``layout_parity`` does).
"""

import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from layout_parity import FirstStepGradients, model_config, read_at_tp1

from megatron_hybrid import backends

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # name: (tp, pp)
ROLLOUTS, MICRO_BATCH, STEPS = 8, 2, 3


def rollouts(model_cfg) -> list[dict]:
    """A fixed batch: random prompts and responses, a response region per row, advantages of
    two groups of 4, and a reference perturbation (added to the recomputed log-probs)."""
    generator = torch.Generator().manual_seed(7)
    seq = model_cfg.seq_length
    ids = torch.randint(0, model_cfg.vocab_size, (ROLLOUTS, seq + 1), generator=generator)
    rewards = torch.rand(ROLLOUTS, generator=generator)
    from megatron_hybrid.stages import grpo_objective

    advantages = grpo_objective.group_advantages(rewards, 4)
    samples = []
    for row in range(ROLLOUTS):
        mask = torch.zeros(seq)
        mask[6 + row:seq - 3] = 1  # responses of different lengths
        samples.append({"tokens": ids[row, :-1], "labels": ids[row, 1:], "loss_mask": mask,
                        "advantage": advantages[row],
                        "ref_shift": 0.05 * torch.randn(seq, generator=generator)})
    return samples


def run_layout(model_cfg, name: str, work_dir: Path, world_size: int) -> dict:
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups
    from megatron_hybrid.stages import grpo_objective

    tp, pp = LAYOUTS[name]
    dims = process_groups.ParallelDims(tp=tp, pp=pp, world_size=world_size)
    process_groups.init_distributed(dims, backend="cpu")
    process_groups.seed_everything(0)
    model = build_model(model_cfg, ModelLayout(tp=tp, pp=pp), backend="cpu")
    if name == "tp1":
        dist_checkpoint.save_weights([model], work_dir / "initial_weights")
    dist_checkpoint.load_weights([model], work_dir / "initial_weights")
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")]
    optimizer = FirstStepGradients(training_step.build_optimizer(
        chunks, training_step.OptimizerSettings(lr=1e-2)), chunks[0])
    state = mcore.parallel_state
    dp_rank, dp = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
    local = rollouts(model_cfg)[dp_rank * ROLLOUTS // dp:(dp_rank + 1) * ROLLOUTS // dp]
    old = grpo_objective.token_logps(chunks, local, micro_batch_size=MICRO_BATCH,
                           seq_length=model_cfg.seq_length)
    samples = [{**sample, "old_logp": logp, "ref_logp": logp + sample["ref_shift"]}
               for sample, logp in zip(local, old)]
    losses, norms = [], []
    for _ in range(STEPS):
        batches = iter([torch.utils.data.default_collate(samples[i:i + MICRO_BATCH])
                        for i in range(0, len(samples), MICRO_BATCH)])
        result = training_step.train_step(
            chunks, optimizer, batches, num_microbatches=len(samples) // MICRO_BATCH,
            micro_batch_size=MICRO_BATCH, seq_length=model_cfg.seq_length,
            forward_step=partial(grpo_objective.forward_step, 0.2, 0.1, None))
        losses.append(result.loss)
        norms.append(result.grad_norm)
    gathered = [torch.zeros_like(old) for _ in range(dp)]
    dist.all_gather(gathered, old, group=state.get_data_parallel_group())
    with torch.no_grad():  # the first step's gradients, written as this layout's weights
        for param_name, param in model.named_parameters():
            param.copy_(optimizer.gradients[param_name])
    dist_checkpoint.save_weights([model], work_dir / f"gradients_{name}")
    state.destroy_model_parallel()
    return {"loss": losses, "grad_norm": norms, "old_logp": torch.cat(gathered)}


def main():
    backends.install("cpu")
    out_path, pattern = Path(sys.argv[1]), sys.argv[2]
    model_cfg = model_config(pattern)
    world_size = int(os.environ["WORLD_SIZE"])
    runs = {name: run_layout(model_cfg, name, out_path.parent, world_size) for name in LAYOUTS}
    results = {"runs": runs,
               "gradients": read_at_tp1(model_cfg, LAYOUTS, out_path.parent,
                                        world_size)["gradients"]}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
