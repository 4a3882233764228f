"""Minitron pruning through the CLI on the CPU, with ModelOpt's mcore_minitron for real.

- bad targets (not a multiple, more than the model has, unknown sizes) are refused before
  anything is loaded, naming the allowed values;
- recipes/tiny/prune.yaml prunes a (shortly pretrained) tiny-nano-v2-12b by the 12B -> 9B
  width ratios to the tiny-nano-v2-9b widths and depth; the layers dropped are the ones
  ModelOpt ranks least important, whatever their kinds (so the pattern need not be the
  tiny-nano-v2-9b flavor's), it keeps its `|` stage mark; the report names its held-out data;
- with prune.task_data the held-out loss is measured on the task's conversations;
- the pruned checkpoint reloads at TP=1 and TP=2 with the same loss, and pruning at PP=2
  gives the same model as at PP=1.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rank_environment
from workers import prune_runs

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model import flavors
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.cli.stages import COMMANDS
from megatron_hybrid.stages import prune
from megatron_hybrid.stages.config import PRUNABLE

PRUNE_COMMAND = COMMANDS["prune"]

RELOAD_WORKER = Path(__file__).parents[1] / "workers" / "prune_reload.py"
RECIPE = str(prune_runs.RECIPES / "prune.yaml")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return prune_runs.shared_base(tmp_path_factory)


@pytest.fixture(scope="session")
def pruned_pp1(runs_dir):
    return prune_runs.pruned(runs_dir, pp=1)


@pytest.fixture(scope="session")
def pruned_pp2(runs_dir):
    return prune_runs.pruned(runs_dir, pp=2)


def report_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "prune_report.json").read_text())


def run_in_process(*args):
    parser = argparse.ArgumentParser()
    PRUNE_COMMAND.add_arguments(parser)
    return PRUNE_COMMAND.run(parser.parse_args([RECIPE, "checkpoint.load=no/such/checkpoint", *args]))


@pytest.mark.parametrize("override, expected", [
    ("prune.export_config.hidden_size=100",
     "hidden_size=100 is not a size the model's 128 can be pruned to: choose a multiple of "
     "prune.hidden_size_divisor (16) up to 128: 16, 32, 48, 64, 80, 96, 112, 128"),
    ("prune.export_config.mamba_num_heads=15",
     "choose a multiple of model.mamba_num_groups (2) up to 16: 2, 4, 6, 8, 10, 12, 14, 16"),
    ("prune.export_config.num_attention_heads=16",
     "num_attention_heads=16 is not a size the model's 8 can be pruned to"),
    ("prune.export_config.num_layers=36",
     "num_layers=36 is not a size the model's 35 can be pruned to: choose a multiple of "
     "prune.num_layers_divisor (1) up to 35"),
    ("prune.export_config.num_query_groups=1",
     "'num_query_groups' cannot be pruned: choose from " + ", ".join(PRUNABLE)),
    ("prune.export_config.hiden_size=64", "did you mean hidden_size?"),
    ("prune.export_config.num_moe_experts=4",
     "prune.export_config.num_moe_experts: the model has no MoE layers: remove the key"),
])
def test_bad_targets_are_refused_before_loading(override, expected):
    with pytest.raises(ConfigError) as error:  # the checkpoint does not exist: never read
        run_in_process(override)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_missing_checkpoint_and_layout_errors_name_the_fix():
    with pytest.raises(RuntimeError, match="no/such/checkpoint does not exist"):
        run_in_process()
    with pytest.raises(ConfigError, match="pruning runs at parallel.tp=1"):
        run_in_process("parallel.tp=2")
    with pytest.raises(ConfigError, match="pruning measures held-out loss: give data.split a "
                                          "validation share"):
        run_in_process("data.default_corpus=false", "data.blend=[some/prefix]",
                       "data.split='100,0,0'")


def test_tiny_prune_recipe_mirrors_12b_to_9b():
    cfg = prune_runs_recipe()
    big, small = flavors.get_flavor("nano-v2-12b"), flavors.get_flavor("nano-v2-9b")
    tiny_big, tiny_small = flavors.get_flavor("tiny-nano-v2-12b"), flavors.get_flavor(
        "tiny-nano-v2-9b")
    assert cfg.model == tiny_big
    target = cfg.prune.export_config
    assert target == {"hidden_size": tiny_small.hidden_size,
                      "ffn_hidden_size": tiny_small.ffn_hidden_size,
                      "num_layers": tiny_small.num_layers}
    for name in ("hidden_size", "ffn_hidden_size"):  # the published width ratios, exactly
        assert target[name] / getattr(tiny_big, name) == getattr(small, name) / getattr(big, name)


def prune_runs_recipe():
    from megatron_hybrid.recipe import load_recipe

    return load_recipe(RECIPE)


def test_task_data_measures_heldout_loss_on_the_tasks_assistant_tokens():
    from megatron_hybrid import backends
    from megatron_hybrid.recipe import load_recipe

    backends.install("cpu")  # the corpus datasets are Megatron-Core's
    cfg = load_recipe(RECIPE, [*prune_runs.SMALL, *prune_runs.PRUNE_DATA, "prune.task_data=true",
                               "train.seq_length=128"])  # a conversation fits
    data = prune.CalibrationData(cfg)
    mask = [data.valid[sample]["loss_mask"] for sample in range(cfg.prune.heldout_samples)]
    tokens = int(sum(sample.sum() for sample in mask))
    assert 0 < tokens < len(mask) * 128 // 2  # answers only: no prompt, no padding
    assert data.description == f"task conversations, assistant tokens, {tokens:,} tokens"
    assert len(data.train[0]["tokens"]) == 128 and data.train[0]["loss_mask"].all()  # corpus


def test_prune_gives_the_tiny_9b_sizes_modelopts_layers_and_report(pruned_pp1):
    report = report_of(pruned_pp1)
    meta = json.loads((Path(report["output"]) / "meta.json").read_text())
    source, target = flavors.get_flavor("tiny-nano-v2-12b"), flavors.get_flavor("tiny-nano-v2-9b")
    dropped = [layer["index"] for layer in report["dropped_layers"]]
    expected_pattern = source.layer_pattern.drop_layers(dropped).text
    assert len(dropped) == 4 and meta["model"]["pattern"] == expected_pattern
    assert expected_pattern.count("|") == 1  # the stage mark survives the depth prune
    saved = ModelConfig(**meta["model"])
    # ModelOpt prunes the local spec, and the checkpoint says which implementation wrote it
    # (any run loads it as its own: stages.common.saved_model).
    assert {name: value for name, value in meta["model"].items() if name != "pattern"} == {
        name: value for name, value in target.replace(transformer_impl="local").to_dict().items()
        if name != "pattern"}
    dropped_kinds = [layer["kind"] for layer in report["dropped_layers"]]
    assert saved.layer_pattern.counts == {  # per kind: what ModelOpt's ranking removed
        kind: count - dropped_kinds.count(kind)
        for kind, count in source.layer_pattern.counts.items()}
    assert saved.num_layers == target.num_layers
    assert report["sizes"] == {"hidden_size": [128, 112], "ffn_hidden_size": [512, 392],
                               "num_layers": [35, 31]}
    assert [layer["kind"] for layer in report["dropped_layers"]] == [
        source.layer_pattern.layers[i] for i in dropped]
    importance = report["layer_importance"]
    assert len(importance) == 35 and all(score > 0 for score in importance)
    kept = [score for i, score in enumerate(importance) if i not in dropped]
    assert max(importance[i] for i in dropped) <= min(kept)  # the least important went
    before, after = report["params"]
    assert 0.6 * before < after < 0.85 * before
    assert all(0 < loss < 10 for loss in report["heldout_loss"])
    assert (pruned_pp1 / "layer_importance.png").read_bytes()[:4] == b"\x89PNG"
    assert report["heldout_data"] == f"corpus text, {16 * 64:,} tokens"
    markdown = (pruned_pp1 / "prune_report.md").read_text()
    assert f"{before:,} -> {after:,}" in markdown and "| hidden_size | 128 | 112 |" in markdown
    assert "pattern: " + expected_pattern in (pruned_pp1 / "model.yaml").read_text().replace(
        "'", "")


@pytest.fixture(scope="session")
def reload_losses(pruned_pp1, pruned_pp2, tmp_path_factory):
    out = tmp_path_factory.mktemp("reload") / "losses.json"
    pp1, pp2 = (report_of(run)["output"] for run in (pruned_pp1, pruned_pp2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(RELOAD_WORKER), str(out),
               f"pp1_tp1={pp1}:1", f"pp1_tp2={pp1}:2", f"pp2_tp1={pp2}:1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=rank_environment(2))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_pruned_checkpoint_reloads_at_tp1_and_tp2(reload_losses):
    losses = reload_losses["loss"]
    assert 0 < losses["pp1_tp1"] < 10
    assert losses["pp1_tp2"] == pytest.approx(losses["pp1_tp1"], rel=1e-5)


def test_pruning_at_pp2_gives_the_pp1_model(pruned_pp1, pruned_pp2, reload_losses):
    pp1, pp2 = report_of(pruned_pp1), report_of(pruned_pp2)
    assert pp2["dropped_layers"] == pp1["dropped_layers"] and pp2["pattern"] == pp1["pattern"]
    assert pp2["params"] == pp1["params"]
    assert pp2["layer_importance"] == pytest.approx(pp1["layer_importance"], rel=1e-4)
    assert pp2["heldout_loss"] == pytest.approx(pp1["heldout_loss"], rel=1e-5)
    losses = reload_losses["loss"]
    assert losses["pp2_tp1"] == pytest.approx(losses["pp1_tp1"], rel=1e-5)


def test_prunable_sizes_are_modelopts(reload_losses):
    assert set(PRUNABLE) <= set(reload_losses["supported_hparams"])


@pytest.fixture(scope="session")
def searched(runs_dir):
    out = runs_dir / "prune-search"
    prune_runs.run("prune", RECIPE, *prune_runs.SMALL, *prune_runs.PRUNE_DATA,
                   f"output_dir={out}", f"checkpoint.load={prune_runs.pretrained(runs_dir)}",
                   "prune.export_config=null", "prune.max_params=3e6", "prune.top_k=2",
                   "prune.ffn_hidden_size_divisor=64",
                   "prune.skip_hparams=[mamba_num_heads, mamba_head_dim, num_attention_heads]")
    return report_of(out)


def test_search_keeps_the_best_candidate_under_the_budget(searched):
    before, after = searched["params"]
    assert after <= 3e6 < before
    candidates = searched["candidates"]
    assert len(candidates) == 2 and all(c["params"] <= 3e6 for c in candidates)
    best = min(candidates, key=lambda c: c["heldout_loss"])
    assert after == best["params"]  # the rebuilt model is the candidate that scored best
    assert searched["heldout_loss"][1] == pytest.approx(best["heldout_loss"], rel=1e-5)
    assert searched["pattern"][1].count("|") == 1


def test_a_memory_budget_is_what_an_a10g_holds_next_to_128k_tokens_of_caches():
    from megatron_hybrid.planning import planner
    from megatron_hybrid.stages.config import PruneConfig

    options = PruneConfig(serve_gpu="a10g")  # serve_context: 131072
    options.validate()
    twelve, nine = (flavors.get_flavor(name) for name in ("nano-v2-12b", "nano-v2-9b"))
    budget = prune.parameter_budget(options, twelve)
    # The published compression's goal: the 9B fits one A10G at 128k, the 12B does not.
    assert planner.total_parameters(nine) < budget < planner.total_parameters(twelve)
    with pytest.raises(ConfigError, match="leaves no memory for weights"):
        prune.parameter_budget(PruneConfig(serve_gpu="a10g", serve_context=2**24), twelve)
