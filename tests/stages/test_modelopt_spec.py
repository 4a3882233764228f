"""Prune and distill build the local spec (ModelOpt cannot convert the Transformer Engine
spec) and read checkpoints saved by either implementation."""

import dataclasses
import json
from pathlib import Path

from megatron_hybrid import recipe
from megatron_hybrid.stages import common, distill, prune

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tiny"


def saved_by_a_transformer_engine_run(directory: Path, model) -> str:
    """A checkpoint folder whose meta says a ``transformer_impl=transformer_engine`` run wrote
    it (its tensors are not read by the checks before loading)."""
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    meta = {"model": dataclasses.replace(model, transformer_impl="transformer_engine").to_dict()}
    (directory / "meta.json").write_text(json.dumps(meta))
    return str(directory)


def test_prune_and_distill_read_a_transformer_engine_checkpoint_into_the_local_spec(tmp_path):
    cfg = recipe.load_recipe(str(RECIPES / "prune.yaml"), [])
    source = saved_by_a_transformer_engine_run(tmp_path / "source", cfg.model)
    pruned = prune.check_request(dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=source)))
    assert pruned.model.transformer_impl == "local"

    teacher_model = cfg.model
    cfg = recipe.load_recipe(str(RECIPES / "distill.yaml"), [])
    cfg = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=saved_by_a_transformer_engine_run(
            tmp_path / "student", cfg.model)),
        distill=dataclasses.replace(cfg.distill, teacher=saved_by_a_transformer_engine_run(
            tmp_path / "teacher", teacher_model)))
    student, teacher = distill.check_request(cfg)
    assert (student.model.transformer_impl, teacher.transformer_impl) == ("local", "local")


def test_a_gpu_recipe_is_told_on_stderr(capsys):
    cfg = recipe.load_recipe(str(RECIPES / "prune.yaml"), ["parallel.backend=cuda"])
    assert common.with_modelopt_spec(cfg, "prune").model.transformer_impl == "local"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "prune: model.transformer_impl=local (ModelOpt cannot convert the Transformer Engine "
        "spec; checkpoints load across the two)\n")
    local = recipe.load_recipe(str(RECIPES / "prune.yaml"), ["model.transformer_impl=local"])
    assert common.with_modelopt_spec(local, "prune") is local
    assert capsys.readouterr().err == ""
