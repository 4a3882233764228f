"""Train a few steps through the real training loop and report what each step changed.

Usage: skipped_step.py OUT RECIPE [key=value ...]   (with MEGATRON_HYBRID_FAULT=nan@step.N)

The loop reports every finished step (after the optimizer and the LR scheduler have run) to
its tracker; this one keeps a copy of the weights, the Adam state (exp_avg, exp_avg_sq, step)
and the LR schedule (the scheduler's state and every parameter group's lr and weight decay),
and writes to OUT, as JSON, for each step which tensors or schedule entries differ bitwise from
the step before, plus every name compared.
"""

import json
import sys

import torch

from megatron_hybrid import backends, recipe

ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")


def bitwise_equal(a, b) -> bool:
    """Same bits (tensors) or the same exact repr (Python numbers, strings, None)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return repr(a) == repr(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside the run's optimizer (skip wrapper, Megatron, chained)."""
    megatron_optimizer = optimizer.optimizer
    return [part.optimizer for part in
            getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])]


def snapshot(trainer) -> dict[str, dict]:
    """Copies of everything a skipped step must leave alone, by category and name."""
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap

    (chunk,) = trainer.model_chunks
    names = {param: name for name, param in unwrap(chunk).named_parameters()}
    state = {"weights": {name: param.detach().clone() for param, name in names.items()},
             **{key: {} for key in ADAM_STATE}, "schedule": {}}
    for index, torch_optimizer in enumerate(torch_optimizers(trainer.optimizer)):
        for group_index, group in enumerate(torch_optimizer.param_groups):
            for key in ("lr", "weight_decay"):
                state["schedule"][f"optimizer {index} group {group_index} {key}"] = group[key]
            for param in group["params"]:
                for key, value in torch_optimizer.state.get(param, {}).items():
                    state[key][names[param]] = value.clone() if torch.is_tensor(value) else value
    for key, value in trainer.scheduler.state_dict().items():
        state["schedule"][f"scheduler {key}"] = value
    return state


def changed(before: dict, after: dict) -> dict[str, list[str]]:
    """Per category, the names whose value differs (or appeared, or went away)."""
    return {category: sorted(name for name in before[category].keys() | after[category].keys()
                             if name not in before[category] or name not in after[category]
                             or not bitwise_equal(before[category][name],
                                                  after[category][name]))
            for category in before}


class StateAfterEachStep:
    """The loop's tracker: what each finished step changed, against the state before it."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.previous = snapshot(trainer)
        self.steps: list[dict] = []

    def step(self, step: int, *, loss: float, **_metrics) -> None:
        current = snapshot(self.trainer)
        self.steps.append({"step": step, "loss": loss,
                           "applied": self.trainer.optimizer.update_applied,
                           "changed": changed(self.previous, current)})
        self.previous = current

    def log_eval(self, step: int, loss: float | None) -> None:
        """Evaluation changes nothing this test looks at."""

    def report(self) -> dict:
        return {"steps": self.steps,
                "names": {category: sorted(values) for category, values in self.previous.items()}}


def main() -> None:
    out, recipe_path, *overrides = sys.argv[1:]
    cfg = recipe.load_recipe(recipe_path, overrides)
    backends.install("cpu")
    from megatron_hybrid.engine import training_loop

    with training_loop.session(cfg) as (backend, dims):
        trainer = training_loop.build_trainer(cfg, backend, dims)
        tracker = StateAfterEachStep(trainer)
        trainer.train(tracker)
    with open(out, "w") as handle:
        json.dump(tracker.report(), handle)


if __name__ == "__main__":
    main()
