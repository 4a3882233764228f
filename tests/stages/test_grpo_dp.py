"""GRPO at DP=2: each rank samples its own share of a step's prompts on its own engine, and the
update keeps the two replicas equal. Run as a script under torchrun, this module is the
worker: two GRPO steps of the stage's loop on the small model, then rank 0 writes what each
rank saw (``torch.save`` to argv[1])."""

import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_sft import RECIPE, SMALL_MODEL

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported

STEPS = 2
OVERRIDES = [*SMALL_MODEL, "checkpoint.load=null", "train.seq_length=64",
             f"train.max_steps={STEPS}", "train.micro_batch_size=4",
             "train.global_batch_size=8", "grpo.rollout_batch=2", "grpo.group_size=4",
             "grpo.max_new_tokens=8", "grpo.task_samples=0", "grpo.kl_coef=0.1",
             "optimizer.lr=1e-2", "grpo.rewards={'test_grpo:vowel_share': 1.0}",
             "logging.progress_bar=off", "logging.tensorboard=false"]


def flat_weights(chunks) -> torch.Tensor:
    """This rank's weights, all in one vector (after any pending weight all-gather)."""
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
    from megatron_hybrid.engine import training_step

    training_step.sync_params(chunks)
    return torch.cat([p.detach().flatten().clone() for c in chunks
                      for p in unwrap(c).parameters()])


def worker(out: Path) -> None:
    """Two steps of :class:`grpo.Loop` at DP=2; per rank: its prompts per step, the weights
    before and after, and the step metrics."""
    from megatron_hybrid import recipe
    from megatron_hybrid.data.tokenizer import load_tokenizer
    from megatron_hybrid.engine import training_loop
    from megatron_hybrid.stages import grpo, rewards

    cfg = recipe.load_recipe(RECIPE.with_name("grpo.yaml"),
                             [*OVERRIDES, f"output_dir={out.parent / 'run'}"])
    with training_loop.session(cfg) as (backend, dims):
        assert dims.dp == 2
        trainer = training_loop.build_trainer(cfg, backend, dims, datasets=(None, None))
        loop = grpo.Loop(cfg, cfg.grpo, trainer, load_tokenizer(cfg.tokenizer),
                         rewards.task_prompts("train"), backend)
        seen = {"start": flat_weights(trainer.model_chunks), "prompts": [], "metrics": []}
        for step in range(1, STEPS + 1):
            seen["prompts"].append(loop.step_prompts(step))
            seen["metrics"].append(loop.step(step)[1])
        seen["end"] = flat_weights(trainer.model_chunks)
        ranks = [None, None]
        dist.all_gather_object(ranks, seen)
        if dist.get_rank() == 0:
            torch.save(ranks, out)


def test_grpo_at_dp2_samples_each_ranks_share_and_keeps_the_replicas_equal(tmp_path):
    from conftest import rank_environment  # pytest's path; the worker does not need it

    from megatron_hybrid import recipe
    from megatron_hybrid.data import chat
    from megatron_hybrid.stages import rewards

    out = tmp_path / "ranks.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", __file__, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=rank_environment(2), cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = torch.load(out, weights_only=False)
    cfg = recipe.load_recipe(RECIPE.with_name("grpo.yaml"), OVERRIDES)
    prompts = rewards.task_prompts("train")
    order = chat.EpochOrder(len(prompts), cfg.data.seed)
    for step in range(STEPS):  # the two shares are the step's prompts at DP=1, in order
        assert first["prompts"][step] + second["prompts"][step] == [
            prompts[order(sample)] for sample in range(2 * step, 2 * step + 2)]
    assert torch.equal(first["start"], second["start"])
    assert torch.equal(first["end"], second["end"])  # one update, on both replicas
    assert not torch.equal(first["start"], first["end"])
    assert first["metrics"] == second["metrics"]  # reduced over both ranks' rollouts
    assert all(m["engine_logp_gap"] < 1e-5 and m["response_length"] > 0
               for m in first["metrics"])


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
