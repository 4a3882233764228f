"""``prune.per_layer_ffn``: Minitron pruning to per-layer FFN widths (heterogeneous blocks)
through the CLI on the CPU, from the session's pretrained tiny-nano-v2-12b
(tests/workers/prune_runs.py), with recipes/tiny/prune.yaml's target (FFN 512 -> 392).

- refused in one line where it cannot run: no FFN target, search mode, PP=2, a source that
  already has per-layer sizes;
- the checkpoint's meta.json holds layer_overrides for the MLP layers whose width is not the
  target; the widths are multiples of the divisor and share out exactly the uniform prune's
  channels, so the model has exactly the uniform prune's parameters (ModelOpt's count, the
  built model's and the planner's);
- the report's uniform comparison, cut from the same sorted channels, has exactly the
  held-out loss of ModelOpt's own uniform prune (prune_runs' PP=1 run of the same recipe):
  each layer keeps ModelOpt's ranking of its channels;
- the pruned checkpoint loads and trains (its held-out loss, not a fresh model's); loading
  per-layer sizes at other layouts is tests/model/test_heterogeneous.py's.
"""

import argparse
import json

import pytest
from workers import prune_runs

from megatron_hybrid.cli.stages import COMMANDS
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.model.params import count_parameters
from megatron_hybrid.planning import planner

RECIPE = str(prune_runs.RECIPES / "prune.yaml")
TARGET, DIVISOR, MLP_LAYERS = 392, 8, 12


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return prune_runs.shared_base(tmp_path_factory)


@pytest.fixture(scope="module")
def per_layer(runs_dir):
    out = runs_dir / "prune-per-layer"
    prune_runs.run("prune", RECIPE, *prune_runs.SMALL, *prune_runs.PRUNE_DATA,
                   f"output_dir={out}", f"checkpoint.load={prune_runs.pretrained(runs_dir)}",
                   "prune.per_layer_ffn=true")
    report = json.loads((out / "prune_report.json").read_text())
    meta = json.loads((out / "checkpoints" / "step_000000" / "meta.json").read_text())
    return report, ModelConfig(**meta["model"]), (out / "prune_report.md").read_text()


def prune_in_process(*args):
    command = COMMANDS["prune"]
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args([RECIPE, *args]))


def test_refused_in_one_line_where_it_cannot_run(runs_dir):
    pretrained = f"checkpoint.load={prune_runs.pretrained(runs_dir)}"
    cases = [
        ([pretrained, "prune.export_config=null", "prune.export_config={hidden_size: 112}"],
         "prune.per_layer_ffn shares out the uniform target's FFN channels: set "
         "prune.export_config.ffn_hidden_size below the model's 512"),
        ([pretrained, "prune.export_config=null", "prune.max_params=3e6"],
         "set prune.export_config.ffn_hidden_size below the model's 512"),
        ([pretrained, "parallel.pp=2"], "prune.per_layer_ffn runs at parallel.pp=1, got 2"),
        (["checkpoint.load=no/such/checkpoint",
          "model.layer_overrides={1: {ffn_hidden_size: 256}}"],
         "model.layer_overrides: Minitron's uniform pruning cannot rank per-layer sizes"),
    ]
    for args, expected in cases:
        with pytest.raises(ConfigError) as error:
            prune_in_process(*args, "prune.per_layer_ffn=true")
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_per_layer_widths_share_out_the_uniform_budget(per_layer):
    report, model, markdown = per_layer
    widths = report["per_layer_ffn"]["widths"]
    mlp_layers = [i for i, symbol in enumerate(model.layer_pattern.layers) if symbol == "-"]
    assert len(widths) == len(mlp_layers) == MLP_LAYERS
    assert sum(widths) == MLP_LAYERS * TARGET and len(set(widths)) > 1
    assert all(width % DIVISOR == 0 and DIVISOR <= width <= 512 for width in widths)
    assert model.ffn_hidden_size == TARGET
    assert {index: model.for_layer(index).ffn_hidden_size for index in mlp_layers} == dict(
        zip(mlp_layers, widths))
    assert set(model.layer_overrides) == {i for i, w in zip(mlp_layers, widths) if w != TARGET}
    uniform_params = report["per_layer_ffn"]["uniform"]["params"]
    assert report["params"][1] == uniform_params == count_parameters(model)["total"] \
        == planner.total_parameters(model)
    assert f"Per-layer FFN widths (MLP layers in order): {widths}" in markdown


def test_uniform_comparison_is_modelopts_own_uniform_prune(runs_dir, per_layer):
    report = per_layer[0]
    uniform = json.loads((prune_runs.pruned(runs_dir, pp=1) / "prune_report.json").read_text())
    assert report["per_layer_ffn"]["uniform"]["params"] == uniform["params"][1]
    assert report["per_layer_ffn"]["uniform"]["heldout_loss"] == pytest.approx(
        uniform["heldout_loss"][1], rel=1e-6)
    assert report["dropped_layers"] == uniform["dropped_layers"]
    assert 0 < report["heldout_loss"][1] < 10


def test_loads_and_trains(per_layer, tmp_path):
    report, model, _ = per_layer
    trained = tmp_path / "trained"
    prune_runs.run("train", str(prune_runs.RECIPES / "distill.yaml"), *prune_runs.SMALL,
                   f"checkpoint.load={report['output']}", f"model.pattern={model.pattern}",
                   f"model.layer_overrides={json.dumps(model.layer_overrides)}",
                   f"output_dir={trained}", "train.max_steps=2",
                   "train.global_batch_size=2", "train.eval_interval=1000", "train.eval_batches=2",
                   "scheduler.warmup_steps=0", "checkpoint.save_interval=2")
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    final_eval = [record for record in records if record["kind"] == "eval"][-1]
    # The pruned weights, not a fresh model's (about ln(1024) = 6.9).
    assert final_eval["step"] == 2 and final_eval["loss"] < report["heldout_loss"][1] + 0.5 < 6.5
    saved = json.loads((trained / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert ModelConfig(**saved["model"]).layer_overrides == model.layer_overrides
