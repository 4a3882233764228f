"""Nemotron-H's compressions (arXiv 2504.03624) as recipes: 8B -> 4B (Minitron width pruning,
Mamba heads within their groups) and 56B -> 47B (FFN width, and the layers ``prune.drop_layers``
names so that the rest is the published 47B pattern), each followed by distillation.

- the published recipes (meta device only) export exactly the published target flavors: the
  same config, so the same parameter count, and sizes the source can be pruned to;
- their tiny twins run for real on the CPU (ModelOpt's mcore_minitron on an initialized tiny
  parent) and save exactly the tiny target flavors;
- ``prune.drop_layers`` is refused in one line where it cannot apply.
"""

import json
from pathlib import Path

import pytest

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported
from megatron_hybrid import mcore  # noqa: E402,F401
from megatron_hybrid.errors import ConfigError  # noqa: E402
from megatron_hybrid.model import flavors, params  # noqa: E402
from megatron_hybrid.model.config import ModelConfig  # noqa: E402
from megatron_hybrid.recipe import load_recipe  # noqa: E402
from megatron_hybrid.stages import prune  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
COMPRESSIONS = {  # recipe: (source flavor, target flavor, its distillation recipe)
    "nemotron_h/prune_8b_to_4b.yaml": ("nemotron-h-8b", "nemotron-h-4b",
                                       "nemotron_h/distill_4b.yaml"),
    "nemotron_h/prune_56b_to_47b.yaml": ("nemotron-h-56b", "nemotron-h-47b",
                                         "nemotron_h/distill_47b.yaml"),
    "tiny/prune_8b_to_4b.yaml": ("tiny-nemotron-h-8b", "tiny-nemotron-h-4b",
                                 "tiny/distill_4b.yaml"),
    "tiny/prune_56b_to_47b.yaml": ("tiny-nemotron-h-56b", "tiny-nemotron-h-47b",
                                   "tiny/distill_47b.yaml"),
}
SMALL = ["train.seq_length=64", "train.micro_batch_size=2", "logging.progress_bar=off",
         "logging.tensorboard=false", "logging.plot=false"]
PRUNE_DATA = ["prune.calibration_samples=2", "prune.heldout_samples=2"]


def expected_output(cfg) -> ModelConfig:
    """What manual mode makes of the recipe's model: its sizes, less the named layers."""
    options, source = cfg.prune, cfg.model
    pattern = source.layer_pattern.drop_layers(options.drop_layers or []).text
    return source.replace(pattern=pattern, **options.export_config)


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_recipes_export_exactly_the_target_flavor(name):
    source, target, distill = COMPRESSIONS[name]
    cfg = load_recipe(RECIPES / name)
    assert cfg.model == flavors.get_flavor(source)
    cfg.prune.check_against(cfg.model)  # sizes the source can be pruned to
    assert expected_output(cfg) == flavors.get_flavor(target)
    student = load_recipe(RECIPES / distill)
    assert student.model == flavors.get_flavor(target)
    assert student.distill.logits_temperature == 1.0 and student.distill.lm_loss_weight == 0.0
    assert f"/{cfg.name}/" in student.checkpoint.load  # the prune's output
    assert source in student.distill.teacher  # the parent teaches


def test_pruned_parameter_counts_are_the_published_ones():
    from megatron_hybrid.planning import planner

    # The pruned model built on the meta device against the planner's count of the published
    # flavor: 4,489,223,040 (4B) and 46,791,554,816 (47B), untied embeddings included.
    for name, published in (("nemotron_h/prune_8b_to_4b.yaml", 4_489_223_040),
                            ("nemotron_h/prune_56b_to_47b.yaml", 46_791_554_816)):
        target = flavors.get_flavor(COMPRESSIONS[name][1])
        pruned = expected_output(load_recipe(RECIPES / name))
        assert params.count_parameters(pruned)["total"] == planner.total_parameters(
            target) == published


def test_the_47b_keeps_the_56bs_layers_in_order_and_drops_published_kinds():
    cfg = load_recipe(RECIPES / "nemotron_h/prune_56b_to_47b.yaml")
    layers = cfg.model.layer_pattern.layers
    dropped = [layers[i] for i in cfg.prune.drop_layers]
    assert {kind: dropped.count(kind) for kind in "M-*"} == {"M": 9, "-": 6, "*": 5}
    assert cfg.parallel.tp == 1 and cfg.parallel.pp == 2  # 112 GB of bf16 on two 80 GB GPUs


@pytest.mark.parametrize("overrides, message", [
    (["prune.drop_layers=[0, 41]"], "prune.drop_layers=[0, 41]: give distinct 0-based layer "
                                    "indices below the model's 41 layers, not all"),
    (["prune.drop_layers=[3, 3]"], "give distinct 0-based layer indices"),
    (["prune.export_config.num_layers=29"], "prune.drop_layers sets the depth: remove "
                                            "prune.export_config.num_layers"),
    (["prune.export_config=null", "prune.max_params=1e6"],
     "not drop_layers and max_params"),
])
def test_bad_drop_layers_are_refused_in_one_line(overrides, message):
    cfg = load_recipe(RECIPES / "tiny/prune_56b_to_47b.yaml", overrides)
    with pytest.raises(ConfigError) as error:
        cfg.prune.validate()
        cfg.prune.check_against(cfg.model)
    assert message in str(error.value) and "\n" not in str(error.value)


def initialized_parent(flavor: str, out: Path) -> Path:
    """A step-0 checkpoint of ``flavor`` as the tiny pretraining recipe initializes it:
    importance needs only activations, and the shapes are what is checked here."""
    from megatron_hybrid.engine import training_loop

    cfg = load_recipe(RECIPES / "tiny/pretrain.yaml", [*SMALL, f"model.flavor={flavor}",
                                                       f"output_dir={out}"])
    with training_loop.session(cfg) as (backend, dims):
        trainer = training_loop.build_trainer(cfg, backend, dims)
        return trainer.checkpointer.save(trainer.state, trainer.model_chunks, trainer.optimizer,
                                         trainer.scheduler)


@pytest.fixture(scope="module")
def pruned_twins(tmp_path_factory):
    """Each tiny twin's prune report."""
    from megatron_hybrid.engine import training_loop

    reports = {}
    for name in ("tiny/prune_8b_to_4b.yaml", "tiny/prune_56b_to_47b.yaml"):
        out = tmp_path_factory.mktemp(Path(name).stem)
        parent = initialized_parent(COMPRESSIONS[name][0], out / "parent")
        cfg = prune.check_request(load_recipe(RECIPES / name, [
            *SMALL, *PRUNE_DATA, f"output_dir={out / 'pruned'}", f"checkpoint.load={parent}"]))
        with training_loop.session(cfg) as (backend, dims):
            reports[name] = prune.prune(cfg, backend, dims)
    return reports


@pytest.mark.parametrize("name", ["tiny/prune_8b_to_4b.yaml", "tiny/prune_56b_to_47b.yaml"])
def test_tiny_twins_save_exactly_the_tiny_target_flavor(pruned_twins, name):
    report = pruned_twins[name]
    target = flavors.get_flavor(COMPRESSIONS[name][1])
    saved = json.loads((Path(report["output"]) / "meta.json").read_text())["model"]
    # ModelOpt prunes the local spec, and the checkpoint says which implementation wrote it.
    assert saved == target.replace(transformer_impl="local").to_dict()
    assert report["params"][1] == params.count_parameters(target)["total"]
    drop = load_recipe(RECIPES / name).prune.drop_layers or []
    assert [layer["index"] for layer in report["dropped_layers"]] == drop
    assert report["target"].get("drop_layers") == (drop or None)
    assert all(0 < loss < 10 for loss in report["heldout_loss"])
