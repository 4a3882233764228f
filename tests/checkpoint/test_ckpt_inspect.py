"""``megatron-hybrid ckpt inspect``: a checkpoint's flavor, pattern, shapes, parameters, layout,
step and tokens, checked against facts obtained independently (the model's own parameter count,
the TrainState that was saved, the tokenizer file's hash), and its diff against a recipe."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends

backends.install("cpu")

from test_convert_tools import save_hf_checkpoint  # noqa: E402
from test_hf_parity import load_hf_torch_reference, model_parallel  # noqa: E402,F401

from megatron_hybrid.checkpoint import dist_checkpoint, hf_checkpoint, inspection
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.model.flavors import get_flavor  # noqa: E402
from megatron_hybrid.model.params import count_parameters  # noqa: E402
from megatron_hybrid.cli.checkpoint import COMMANDS  # noqa: E402
from megatron_hybrid.recipe import load_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pretrain.yaml"
LAYOUT = {"tp": 2, "pp": 2, "cp": 1, "dp": 1}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """tiny-nano-v2-12b imported from a bf16 HF checkpoint (no stage marks in its pattern)."""
    root = tmp_path_factory.mktemp("imported")
    save_hf_checkpoint(load_hf_torch_reference(), root / "hf", get_flavor("tiny-nano-v2-12b"),
                       dtype=torch.bfloat16)
    hf_checkpoint.import_hf(root / "hf", root / "ckpt")
    return root


def save_trained(directory: Path, cfg, state: dist_checkpoint.TrainState) -> Path:
    """A checkpoint written by the training code's Checkpointer, as if saved at LAYOUT."""
    model = build_model(cfg, ModelLayout(), backend="cpu")
    saver = dist_checkpoint.Checkpointer(
        directory, save_interval=None, keep_last=1, config_yaml="",
        meta={"model": cfg.to_dict(), "tokenizer": None, "layout": LAYOUT})
    return saver.save(state, [model], None, None)


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A model of no named flavor's shape, at step 5."""
    cfg = get_flavor("tiny-nano-v2-9b").replace(hidden_size=96)
    state = dist_checkpoint.TrainState(step=5, consumed_samples=20, tokens=5120)
    return cfg, save_trained(tmp_path_factory.mktemp("custom"), cfg, state)


def test_imported_checkpoint(imported):
    report = inspection.inspect_checkpoint(imported / "ckpt")
    cfg = get_flavor("tiny-nano-v2-12b")
    assert report["flavor"] == "tiny-nano-v2-12b" and report["differences_from_flavor"] == {}
    assert report["model"]["pattern"] == cfg.layer_pattern.layers  # the flavor's marks it lacks
    total = count_parameters(cfg)["total"]
    assert report["parameters"] == total and report["parameters_by_dtype"] == {"bfloat16": total}
    assert (report["step"], report["tokens"], report["converted_from"]) == (0, 0, "hf")
    assert report["optimizer_state"] is False
    tokenizer_json = (imported / "hf" / "tokenizer.json").read_bytes()
    assert report["tokenizer"]["sha256"] == hashlib.sha256(tokenizer_json).hexdigest()


def test_checkpoint_of_no_named_flavor(custom):
    cfg, path = custom
    report = inspection.inspect_checkpoint(path)
    assert report["flavor"] is None
    assert report["parameters"] == count_parameters(cfg)["total"]
    assert (report["step"], report["consumed_samples"], report["tokens"]) == (5, 20, 5120)
    assert report["layout"] == LAYOUT and report["model"]["hidden_size"] == 96
    text = inspection.format_report(report)
    assert "flavor      none (no named flavor has these layers and shapes)" in text
    assert "stage 1: layers 14-30" in text  # the saved stage marks
    assert "trained     step 5, 5,120 tokens, 20 samples" in text


def test_closest_flavor_names_what_differs():
    base = get_flavor("tiny-nemotron-h-8b")
    marked = base.pattern[:8] + "|" + base.pattern[8:]  # a stage mark changes no layer
    cfg = base.replace(pattern=marked, seq_length=512)
    assert inspection.closest_flavor(cfg) == ("tiny-nemotron-h-8b", {"seq_length": [512, 256]})
    assert inspection.closest_flavor(cfg.replace(pattern="M-" + base.pattern)) == (None, {})


def test_recipe_diff(imported, custom):
    recipe_model = load_recipe(RECIPE).model
    same = inspection.inspect_checkpoint(imported / "ckpt", recipe=str(RECIPE),
                                         recipe_model=recipe_model)
    assert same["recipe_differences"] == {}  # the recipe's pattern has a stage mark: same layers
    assert "recipe      " + str(RECIPE) + ": same model" in inspection.format_report(same)
    other = inspection.inspect_checkpoint(custom[1], recipe=str(RECIPE),
                                          recipe_model=recipe_model)["recipe_differences"]
    assert set(other) == {"pattern", "hidden_size", "ffn_hidden_size"}
    assert other["hidden_size"] == [96, 128]


def test_cli_prints_json_and_text(imported, capsys):
    parser = argparse.ArgumentParser()
    command = COMMANDS["ckpt"]
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["inspect", str(imported / "ckpt"), "--json"])) == 0
    assert json.loads(capsys.readouterr().out) == inspection.inspect_checkpoint(imported / "ckpt")
    assert command.run(parser.parse_args(["inspect", str(imported / "ckpt")])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "flavor      tiny-nano-v2-12b"
    assert lines[2].startswith("pattern     M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M- (35 layers")


def test_not_a_checkpoint_is_one_line(imported):
    with pytest.raises(dist_checkpoint.CheckpointError, match="is not a complete dist_checkpointing "
                                                         "checkpoint") as error:
        inspection.inspect_checkpoint(imported / "hf")
    assert "\n" not in str(error.value)
