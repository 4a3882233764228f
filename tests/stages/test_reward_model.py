"""The reward model: the Bradley-Terry loss against a hand computation, the scored position,
and the stage end to end on separable synthetic data: preference pairs (held-out pairwise
accuracy well above chance) and ratings (held-out squared error falls)."""

import json
import math

import pytest
import torch
from test_sft import RECIPE, SMALL_MODEL

from megatron_hybrid import backends
from megatron_hybrid.data import chat
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.stages import reward_model, task

backends.install("cpu")  # before Megatron-Core is imported


def test_bradley_terry_loss_matches_a_hand_computation():
    scores = torch.tensor([2.0, 0.5, -1.0, 1.0])  # chosen, rejected, chosen, rejected
    expected = [math.log1p(math.exp(-1.5)), math.log1p(math.exp(2.0))]
    assert reward_model.bradley_terry_loss(scores).tolist() == pytest.approx(expected, rel=1e-6)


def test_the_score_is_read_at_the_responses_last_token():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    # the last label in the loss at 2, 4 (the end: clamped), 0; the model reads it one later
    assert reward_model.last_token_positions(mask).tolist() == [3, 4, 1]


def synthetic(split: str, count: int):
    """Separable data on the task's questions: a reply ending ``yes`` is preferred to (and
    rated 1 against 0) the same reply ending ``no``."""
    problems = task.problems(split)[:count]
    return [(problem.prompt(False), str(problem.answer)) for problem in problems]


def write_data(tmp_path, objective: str) -> None:
    for split, count in (("train", 48), ("valid", 16)):
        lines = []
        for prompt, answer in synthetic(split, count):
            good, bad = chat.response(f"{answer} yes"), chat.response(f"{answer} no")
            if objective == "bradley_terry":
                lines.append({"prompt": list(prompt), "chosen": good, "rejected": bad})
            else:
                lines += [{"prompt": list(prompt), "response": reply,
                           "attributes": {"helpfulness": value, "verbosity": 0.5}}
                          for reply, value in ((good, 1.0), (bad, 0.0))]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")


def train_reward_model(tmp_path, objective: str):
    """12 steps of the stage on the small model and the synthetic data: (report, run dir)."""
    from megatron_hybrid import recipe
    from megatron_hybrid.engine import training_loop

    write_data(tmp_path, objective)
    out = tmp_path / "rm"
    cfg = recipe.load_recipe(RECIPE.with_name("reward_model.yaml"), [
        *SMALL_MODEL, "checkpoint.load=null", f"output_dir={out}", "train.seq_length=64",
        "train.max_steps=12", "train.micro_batch_size=8", "train.global_batch_size=16",
        "optimizer.lr=3e-3", "scheduler.warmup_steps=1", "logging.progress_bar=off",
        "logging.tensorboard=false", "logging.plot=false",
        f"reward_model.objective={objective}", "reward_model.attributes=[helpfulness,verbosity]",
        f"reward_model.train_path={tmp_path / 'train.jsonl'}",
        f"reward_model.valid_path={tmp_path / 'valid.jsonl'}"])
    with training_loop.session(cfg) as (backend, dims):
        report = reward_model.train(cfg, cfg.reward_model, backend, dims)
    return report, out


@pytest.fixture(scope="module")
def preference_reward_model(tmp_path_factory):
    """The Bradley-Terry reward model of the synthetic pairs (a reply ending ``yes`` beats
    the same reply ending ``no``): (report, run dir); GRPO's tests score rollouts with it."""
    return train_reward_model(tmp_path_factory.mktemp("reward_model"), "bradley_terry")


def check_trained(report: dict, out, objective: str) -> None:
    assert json.loads((out / "reward_model_report.json").read_text()) == report
    start, end = report["start"], report["end"]
    if objective == "bradley_terry":
        assert end["pairs"] == 16 and end["pairwise_accuracy"] > 0.85, report
        assert end["loss"] < start["loss"] - 0.2
    else:
        assert end["responses"] == 32 and end["mse"] < start["mse"] / 3, report
    assert (out / "checkpoints" / "step_000012").is_dir()
    saved = json.loads((out / "summary.json").read_text())["task_metrics"]
    assert len(saved) == 2


def test_reward_model_stage_learns_separable_preferences(preference_reward_model):
    """Measured (1 thread), 12 steps: held-out pairwise accuracy 0% -> 100% on 16 pairs (the
    untrained head ranks all pairs alike, here the wrong way; chance is 50%), loss 0.72 ->
    0.15."""
    check_trained(*preference_reward_model, "bradley_terry")


def test_reward_model_stage_learns_separable_ratings(tmp_path):
    """Measured (1 thread), 12 steps: mean squared error 0.36 -> 0.025."""
    check_trained(*train_reward_model(tmp_path, "regression"), "regression")


@pytest.mark.parametrize("overrides, message", [
    (["train.micro_batch_size=3", "train.global_batch_size=6"],
     "train.micro_batch_size=3 must be even for reward_model.objective=bradley_terry"),
    (["reward_model.objective=regression"], "reward_model.objective=regression needs rated "
                                            "responses: set reward_model.train_path"),
    (["reward_model.objective=ranking"], "reward_model.objective"),
])
def test_what_the_reward_model_cannot_train_is_refused_in_one_line(overrides, message):
    from megatron_hybrid import recipe

    cfg = recipe.load_recipe(RECIPE.with_name("reward_model.yaml"), overrides)
    with pytest.raises(ConfigError) as error:
        reward_model.check_request(cfg, cfg.reward_model)
    assert message in str(error.value) and "\n" not in str(error.value)
