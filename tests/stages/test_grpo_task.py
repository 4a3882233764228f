"""GRPO on the arithmetic task itself, through the command line with recipes/tiny/grpo.yaml's
checkers: a small model fine-tuned on the task for a few minutes, then RL on a pool of 8
training problems (16 prompts, two steps a pass over them), against a control that samples the
same prompts with the same seeds and never updates (a learning rate of 1e-12)."""

import pytest
from test_sft import SMALL_MODEL
from workers import prune_runs

from megatron_hybrid.stages import grpo

SFT_STEPS = 150
"""Enough for the small model to write the task's form, with a few right answers (5% of the
held-out problems in each mode): the rewards of a group differ, mostly by partial credit."""
POOL = ["grpo.train_problems=8", "grpo.rollout_batch=8", "train.global_batch_size=64",
        "train.max_steps=16"]
QUIET = ["logging.progress_bar=off", "logging.tensorboard=false", "logging.plot=false"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("task-sft")
    prune_runs.run("sft", str(prune_runs.RECIPES / "sft.yaml"), *SMALL_MODEL, *QUIET,
                   "checkpoint.load=null", f"output_dir={out}", f"train.max_steps={SFT_STEPS}",
                   "sft.task_samples=0", "train.eval_interval=1000",
                   "checkpoint.save_interval=1000")
    return out / "checkpoints" / f"step_{SFT_STEPS:06d}"


def reward_per_pass(checkpoint, out, lr: str) -> list[float]:
    prune_runs.run("grpo", str(prune_runs.RECIPES / "grpo.yaml"), *SMALL_MODEL, *POOL, *QUIET,
                   f"checkpoint.load={checkpoint}", f"output_dir={out}", "grpo.task_samples=0",
                   f"optimizer.lr={lr}", f"optimizer.min_lr={lr}",
                   "checkpoint.save_interval=1000")
    return [reward for *_, reward in grpo.read_summary(out)["reward_per_pass"]]


def test_task_reward_rises_over_passes_and_not_without_updates(finetuned, tmp_path):
    """The rise: the mean reward of the last two passes over the pool minus the first pass's.
    Measured over 5 seeds (train.seed 1234, 2, 3, 4, 5; 1 thread) at lr 3e-3: 0.09-0.15 for
    the learning run, -0.044 to +0.042 for its control; the learning run above its control by
    0.09-0.17."""
    learned = reward_per_pass(finetuned, tmp_path / "learn", "3e-3")
    control = reward_per_pass(finetuned, tmp_path / "control", "1e-12")
    assert len(learned) == len(control) == 8  # 16 steps, 2 a pass
    report = (tmp_path / "learn" / f"{grpo.REPORT}.md").read_text()
    assert f"Mean reward over a pass over the 16 prompts {learned[0]:.3f} (steps 1-2) -> " \
           f"{learned[-1]:.3f} (steps 15-16)." in report
    rise = {name: sum(curve[-2:]) / 2 - curve[0]
            for name, curve in (("learned", learned), ("control", control))}
    assert rise["learned"] > 0.05 and rise["learned"] - rise["control"] > 0.05, (learned,
                                                                                  control)
