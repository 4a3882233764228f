"""Recipe loading: one precedence chain, strict keys and types, one-line errors, round trips,
and every recipe under recipes/ loading and validating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_hybrid.engine.config import OptimizerConfig, TrainConfig
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model import flavors
from megatron_hybrid.parallel.config import ParallelConfig
from megatron_hybrid.recipe import (
    RecipeNotFoundError,
    load_recipe,
    non_default_items,
)
from megatron_hybrid.run_config import RunConfig
from megatron_hybrid.sections import dump_yaml, save_resolved, to_dict

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = sorted(p for p in RECIPES_DIR.rglob("*") if p.suffix in (".yaml", ".yml")
                      and p.name != "pipeline.yaml")  # pipelines: tests/test_pipeline.py

MINIMAL = """
model: {flavor: tiny-nano-v2-12b}
data: {default_corpus: true}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(call, *args, kind=ConfigError) -> str:
    """The message of the error ``call(*args)`` raises; asserts it is a single line."""
    with pytest.raises(kind) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def valid_config(**train) -> RunConfig:
    cfg = load_recipe(None, ["model.flavor=tiny-nano-v2-12b", "data.default_corpus=true"])
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# -- precedence and inheritance ---------------------------------------------------------------

def test_defaults_then_recipe_then_cli(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "train: {max_steps: 50, log_interval: 5}\n"
                                              "optimizer: {lr: 3e-3}\n")
    cfg = load_recipe(path, ["train.max_steps=7", "optimizer.weight_decay=0"])
    assert cfg.train.max_steps == 7  # CLI over recipe
    assert cfg.train.log_interval == 5  # recipe over default
    assert cfg.optimizer.lr == 3e-3 and isinstance(cfg.optimizer.lr, float)  # YAML 1.2 float
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.train.seed == TrainConfig().seed  # untouched default
    assert cfg.optimizer.min_lr == OptimizerConfig().min_lr


def test_override_values_are_yaml(tmp_path):
    cfg = load_recipe(write(tmp_path, "r.yaml", MINIMAL), [
        "train.max_tokens=1_000_000", "checkpoint.save_interval=null", "parallel.backend=cpu",
        "logging.progress_bar=on", "logging.plot=false", "data.default_corpus=false",
        "data.blend=[[0.3, a], [0.7, b]]", "optimizer={lr: 1e-3, clip_grad: 0}"])
    assert cfg.train.max_tokens == 1_000_000
    assert cfg.checkpoint.save_interval is None
    assert cfg.logging.progress_bar == "on"  # a string, not YAML 1.1's True
    assert cfg.logging.plot is False
    assert cfg.data.blend == [[0.3, "a"], [0.7, "b"]]
    assert (cfg.optimizer.lr, cfg.optimizer.clip_grad) == (1e-3, 0.0)  # mapping merged
    assert cfg.optimizer.adam_beta2 == OptimizerConfig().adam_beta2


def test_base_inheritance_two_levels(tmp_path):
    write(tmp_path, "common/grand.yaml", MINIMAL + "name: grand\ntrain: {max_steps: 10, "
                                                  "log_interval: 2}\noptimizer: {lr: 1e-3}\n")
    write(tmp_path, "common/parent.yaml", "base: grand.yaml\ntrain: {max_steps: 20}\n")
    write(tmp_path, "extra.yaml", "train: {eval_interval: 5}\noptimizer: {lr: 2e-3}\n")
    child = write(tmp_path, "stage/child.yaml",
                  "base: [../common/parent.yaml, ../extra.yaml]\nname: child\n")
    cfg = load_recipe(child, ["train.log_interval=3"])
    assert cfg.name == "child"
    assert cfg.train.max_steps == 20  # parent over grandparent
    assert cfg.train.eval_interval == 5  # second base
    assert cfg.optimizer.lr == 2e-3  # later base over earlier
    assert cfg.train.log_interval == 3  # CLI over all
    assert cfg.model == flavors.get_flavor("tiny-nano-v2-12b")


def test_base_cycle_names_the_chain(tmp_path):
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    message = error_of(load_recipe, a)
    assert "cycle" in message and "a.yaml -> " in message and "b.yaml -> " in message
    assert message.rstrip().split(" -> ")[-1].startswith(str(a.resolve()))


def test_flavor_expansion_and_explicit_model_keys(tmp_path):
    path = write(tmp_path, "r.yaml", "model: {flavor: tiny-nano-v2-12b, seq_length: 512}\n"
                                     "data: {default_corpus: true}\n")
    cfg = load_recipe(path, ["model.hidden_size=96"])
    assert cfg.model == flavors.get_flavor("tiny-nano-v2-12b").replace(seq_length=512,
                                                                       hidden_size=96)
    cfg = load_recipe(path, ["model.flavor=tiny-hybrid"])  # explicit keys stay on top
    assert cfg.model == flavors.get_flavor("tiny-hybrid").replace(seq_length=512)


def test_explicit_model_without_flavor(tmp_path):
    model = flavors.get_flavor("tiny-hybrid").to_dict()
    cfg = load_recipe(None, [f"model={json.dumps(model)}", "data.mock=true"])
    assert cfg.model == flavors.get_flavor("tiny-hybrid")


# -- errors: one line, naming the key ---------------------------------------------------------

def test_unknown_keys_name_the_dotted_key_and_suggest(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL)
    message = error_of(load_recipe, path, ["train.max_step=5"])
    assert message.startswith("train.max_step: unknown key; did you mean train.max_steps?")
    assert "micro_batch_size" in message and "recompute" in message
    message = error_of(load_recipe, path, ["trian.max_steps=5"])
    assert message.startswith("trian: unknown key; did you mean train?")
    assert "top level" in message and "base" in message
    message = error_of(load_recipe, path, ["model.hiden_size=5"])
    assert "model.hiden_size: unknown key; did you mean model.hidden_size?" in message
    assert "flavor" in message
    nested = write(tmp_path, "n.yaml", MINIMAL + "parallel: {tp: 1, sequence_paralel: true}\n")
    assert error_of(load_recipe, nested).startswith(
        "parallel.sequence_paralel: unknown key; did you mean parallel.sequence_parallel?")


def test_unknown_flavor(tmp_path):
    message = error_of(load_recipe, None, ["model.flavor=tiny-nano-v2-13b"])
    assert message.startswith("model.flavor: unknown model flavor 'tiny-nano-v2-13b'")
    assert "did you mean" in message and "nemotron-h-8b" in message


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=ten", "train.max_steps: expected int, got 'ten' (str)"),
    ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5 (float)"),
    ("train.seq_length=long", "train.seq_length: expected int or null, got 'long' (str)"),
    ("logging.tensorboard=1", "logging.tensorboard: expected bool (true or false), got 1 (int)"),
    ("logging.plot=yes", "logging.plot: expected bool (true or false), got 'yes' (str)"),
    ("optimizer.lr=fast", "optimizer.lr: expected float, got 'fast' (str)"),
    ("parallel.tp=true", "parallel.tp: expected int, got True (bool)"),
    ("name=null", "name: expected str, got null"),
    ("name=2024", "name: expected str, got 2024 (int)"),
    ("data.blend=a", "data.blend: expected list or null, got 'a' (str)"),
    ("train=5", "train: expected a mapping of keys"),
    ("model=tiny", "model: expected a mapping of keys, got 'tiny' (str): for a flavor write "
                   "model: {flavor: tiny} or model.flavor=tiny"),
])
def test_wrong_types_name_key_and_types(override, expected):
    message = error_of(load_recipe, None, ["model.flavor=tiny", override])
    assert message.startswith(expected), message


def test_int_is_accepted_as_float():
    cfg = load_recipe(None, ["model.flavor=tiny", "optimizer.lr=1", "model.norm_eps=1e-6"])
    assert cfg.optimizer.lr == 1.0 and type(cfg.optimizer.lr) is float
    assert cfg.model.norm_eps == 1e-6


@pytest.mark.parametrize("override", ["train.max_steps", "train.max_steps:5", "=5", "train..x=1"])
def test_bad_override_syntax(override):
    message = error_of(load_recipe, None, [override])
    assert message.startswith(f"override {override!r}: expected key=value")
    assert "e.g. train.max_steps=200" in message


def test_unparsable_override_value():
    message = error_of(load_recipe, None, ["data.blend=[a, b"])
    assert message.startswith("override 'data.blend=[a, b': cannot parse the value")


def test_missing_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = error_of(load_recipe, missing, kind=RecipeNotFoundError)
    assert message == f"recipe file not found: {missing}"
    assert issubclass(RecipeNotFoundError, FileNotFoundError)
    child = write(tmp_path, "child.yaml", "base: gone.yaml\n")
    message = error_of(load_recipe, child, kind=RecipeNotFoundError)
    assert message == f"recipe file not found: {tmp_path / 'gone.yaml'} (base of {child})"


def test_bad_yaml_files(tmp_path):
    message = error_of(load_recipe, write(tmp_path, "bad.yaml", "train:\n  max_steps: [1\n"))
    assert "bad.yaml: invalid YAML at line" in message
    message = error_of(load_recipe, write(tmp_path, "dup.yaml", "train: {}\ntrain: {}\n"))
    assert "dup.yaml: invalid YAML at line 2" in message and "duplicate key 'train'" in message
    message = error_of(load_recipe, write(tmp_path, "list.yaml", "- a\n- b\n"))
    assert "list.yaml: a recipe must be a mapping" in message
    message = error_of(load_recipe, write(tmp_path, "base.yaml", "base: 5\n"))
    assert "base: expected a path or a list of paths" in message


def test_missing_model():
    message = error_of(load_recipe, None, [])
    assert message.startswith("model: no model given: set model.flavor to one of")
    message = error_of(load_recipe, None, ["model.hidden_size=64"])
    assert message.startswith("model: missing model.pattern, model.ffn_hidden_size")
    assert "model.hidden_size," not in message


# -- round trips and printing -----------------------------------------------------------------

def test_dump_load_round_trip(tmp_path):
    cfg = load_recipe(RECIPES_DIR / "tiny" / "pretrain.yaml", [
        "name=\"1e5\"", "logging.progress_bar=off", "train.max_tokens=100000",
        "data.default_corpus=false", "data.blend=[[0.25, x], [0.75, y]]", "model.norm_eps=1e-6",
        "checkpoint.load=runs/other/checkpoints"])
    path = save_resolved(cfg, tmp_path / "deep" / "config.yaml")
    assert path.read_text() == dump_yaml(cfg)
    again = load_recipe(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert dump_yaml(again) == dump_yaml(cfg)
    assert list(tmp_path.joinpath("deep").iterdir()) == [path]  # no temporary file left


def test_non_default_items(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "name: demo\ntrain: {max_steps: 30}\n")
    items = dict(non_default_items(load_recipe(path, ["model.seq_length=128"])))
    assert items == {"name": "demo", "model.flavor": "tiny-nano-v2-12b",
                     "model.seq_length": 128, "train.max_steps": 30,
                     "data.default_corpus": True}
    custom = flavors.get_flavor("tiny-hybrid").replace(hidden_size=48).to_dict()
    items = dict(non_default_items(load_recipe(None, [f"model={json.dumps(custom)}",
                                                      "data.mock=true"])))
    assert "model.flavor" not in items and items["model.hidden_size"] == 48
    assert "model.norm_eps" not in items  # equal to the dataclass default
    # every item works as an override and rebuilds the same config
    cfg = load_recipe(path, ["parallel.tp=2", "logging.plot=false"])
    rebuilt = load_recipe(None, [f"{key}={json.dumps(value)}"
                                 for key, value in non_default_items(cfg)])
    assert rebuilt == cfg


# -- recipes in the repository ----------------------------------------------------------------

def test_recipes_are_found():
    assert RECIPES_DIR / "tiny" / "pretrain.yaml" in RECIPE_FILES


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_recipe_loads_and_validates(path):
    cfg = load_recipe(path)
    cfg.validate()
    assert load_recipe(path) == cfg


def test_tiny_pretrain_recipe():
    cfg = load_recipe(RECIPES_DIR / "tiny" / "pretrain.yaml")
    assert cfg.name == "tiny-pretrain" and cfg.resolved_output_dir == "runs/tiny-pretrain"
    assert cfg.model == flavors.get_flavor("tiny-nano-v2-12b")
    assert cfg.tokenizer.vocab_size == cfg.model.vocab_size
    cfg.validate(world_size=2)
    cfg.validate_for_backend("cpu")


# -- cross-section validation -----------------------------------------------------------------

def test_world_size_message():
    assert ParallelConfig(tp=2, pp=2).check_world_size(8) == 2
    message = error_of(ParallelConfig(tp=2, pp=2).check_world_size, 6)
    assert message.startswith(
        "parallel: tp(2) * pp(2) * cp(1) * dp(?) does not divide world size 6: ")
    assert "multiple of tp * pp * cp = 4 (e.g. 4, 8, 12)" in message
    assert "among 1, 2, 3, 6" in message


@pytest.mark.parametrize("overrides, world_size, expected", [
    (["train.seq_length=512"], None, "train.seq_length (512) exceeds model.seq_length (256)"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], None,
     "train.global_batch_size (10) must be a multiple of train.micro_batch_size (4): "
     "e.g. train.global_batch_size=8 or 12, or train.micro_batch_size=2"),
    (["train.global_batch_size=8", "train.micro_batch_size=4"], 4,
     "train.global_batch_size (8) must be a multiple of train.micro_batch_size (4) * dp (4) = 16: "
     "e.g. train.global_batch_size=16, or train.micro_batch_size=2"),
    (["parallel.pp=4"], None, "parallel.pp: pattern 'M-M-M-M*-M-M-M-M*-|M-M-M-M*-M-M-M-M-' marks 2"),
    (["model.flavor=tiny-nemotron-h-8b", "parallel.pp=4"], None,
     "parallel.pp: cannot split the 30 layers"),
    (["parallel.tp=4"], None,
     "parallel.tp=4 does not divide model.mamba_num_groups (2): choose parallel.tp from 1, 2"),
    (["parallel.cp=3"], None, "parallel.cp=3 needs the sequence length (256, model.seq_length) "
                              "divisible by 2 * cp = 6"),
    (["parallel.cp=8", "model.mamba_num_heads=20"], None,
     "parallel.cp=8 must divide the Mamba heads per tensor-parallel rank "
     "(model.mamba_num_heads / parallel.tp = 20)"),
    (["parallel.cp=3", "model.mamba_num_heads=24", "train.seq_length=192"], None,
     "parallel.cp=3 and the Mamba groups per tensor-parallel rank "
     "(model.mamba_num_groups / parallel.tp = 2) must divide one another"),
    (["parallel.sequence_parallel=true"], None,
     "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["parallel.backend=cpu", "train.precision=bf16"], None,
     "train.precision=bf16 is not supported on the cpu backend: set train.precision=fp32"),
    (["train.precision=fp8-hybrid", "train.seq_length=200"], None,
     "train.precision=fp8-hybrid needs train.seq_length (200) to be a multiple of 16"),
    (["train.precision=fp8-hybrid", "model.hidden_size=120"], None,
     "train.precision=fp8-hybrid needs model.hidden_size (120) to be a multiple of 16"),
    (["train.precision=fp16"], None, "train.precision='fp16': did you mean 'bf16'? "
                                        "choose one of fp32, bf16, fp8-hybrid"),
    (["scheduler.warmup_steps=90"], None, "scheduler.warmup_steps (90) + WSD decay"),
    (["tokenizer.vocab_size=2048"], None, "tokenizer.vocab_size (2048) exceeds model.vocab_size"),
    (["output_dir=runs/{nam}"], None, "output_dir='runs/{nam}': only {name} may be substituted"),
    (["data.default_corpus=false"], None, "data: choose exactly one source"),
    (["model.pattern=M-X"], None, "model.pattern: invalid symbol 'X'"),
])
def test_validate_errors(overrides, world_size, expected):
    cfg = load_recipe(None, ["model.flavor=tiny-nano-v2-12b", "data.default_corpus=true",
                             *overrides])
    message = error_of(cfg.validate, world_size)
    assert message.startswith(expected), message


def test_validate_for_backend():
    cfg = valid_config(precision="bf16")
    cfg.validate()  # backend auto: decided at launch
    cfg.validate_for_backend("cuda")
    assert "not supported on the cpu backend" in error_of(cfg.validate_for_backend, "cpu")


def test_total_steps_and_seq_length():
    cfg = valid_config(max_steps=100, max_tokens=8 * 256 * 10 + 1, global_batch_size=8)
    assert cfg.seq_length == 256 and cfg.total_steps == 11
    assert valid_config(max_tokens=None).total_steps == 100
