"""Each expert's share of the routed tokens, logged while an MoE model trains.

The tiny Nemotron 3 Nano recipe (recipes/tiny/moe_pretrain.yaml) trains with expert parallel 2
under torchrun: every log step's counts hold all the routing choices of both ranks (a rank's
own would be half), its metrics carry the load balance, and the run ends with the heat map and
the report. In one process the counts equal the router's own (Megatron-Core's expert-bias
bookkeeping).
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import rank_environment
from test_moe import nemotron_router_model  # noqa: F401  (a fixture)
from test_train import cli

from megatron_hybrid.engine import expert_load

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "moe_pretrain.yaml"
STEPS, LOG_INTERVAL, BATCH, SEQ, TOPK, EXPERTS = 4, 2, 8, 64, 2, 8


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-ep2")
    command = cli("train", str(RECIPE), f"output_dir={out}", f"train.max_steps={STEPS}",
                  f"train.seq_length={SEQ}", f"train.log_interval={LOG_INTERVAL}",
                  "train.eval_interval=1000", "scheduler.warmup_steps=1",
                  "checkpoint.save_interval=1000", "logging.progress_bar=off", nproc=2)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=rank_environment(2))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result


def test_every_log_step_counts_both_ranks_routing_choices(ep2_run):
    out, _ = ep2_run
    records = expert_load.read_history(out)
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["layers"] == [1, 3, 6, 8, 10, 12, 14]  # the E layers of MEMEM*EMEMEMEME
    for record in records:
        tokens = torch.tensor(record["tokens"])
        assert tokens.shape == (7, EXPERTS)
        # Every token of the interval's global batches makes TOPK choices in every layer.
        assert tokens.sum(dim=1).tolist() == [LOG_INTERVAL * BATCH * SEQ * TOPK] * 7


def test_the_metrics_log_and_the_report_show_the_load(ep2_run):
    out, result = ep2_run
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(train) == STEPS // LOG_INTERVAL
    assert all(1.0 <= r["expert_load_max_over_mean"] <= EXPERTS / TOPK for r in train)
    assert "expert load max/mean" in result.stdout
    assert (out / expert_load.HEAT_MAP).stat().st_size > 10_000
    report = (out / expert_load.REPORT).read_text()
    assert f"![expert load]({expert_load.HEAT_MAP})" in report
    assert report.count("\n| ") == 1 + 7  # header and one row per MoE layer


def test_counts_equal_the_routers_own(nemotron_router_model, tmp_path):  # noqa: F811
    from megatron_hybrid.engine import training_step

    cfg, model = nemotron_router_model
    ddp = training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")
    meter = expert_load.ExpertLoadMeter([ddp], cfg, pp=1, pp_rank=0, run_dir=tmp_path,
                                        is_logging_rank=True)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    ddp(tokens, None, None, labels=tokens).sum().backward()
    routers = [module for name, module in model.named_modules() if name.endswith(".router")]
    expected = torch.stack([router.local_tokens_per_expert for router in routers]).double()
    assert expected.sum() == 2 * 64 * 3  # two E layers, 64 tokens, top-3
    torch.testing.assert_close(meter.counts, expected, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        ddp(tokens, None, None)
    torch.testing.assert_close(meter.counts, expected, rtol=0, atol=0)  # evaluation not counted
    meter.close()


def test_balance_statistics_of_a_hand_computed_load():
    counts = torch.tensor([[5.0, 5.0, 5.0, 5.0], [20.0, 0.0, 0.0, 0.0]])
    stats = expert_load.balance_statistics(counts)
    assert stats["expert_load_max_over_mean"] == pytest.approx((1.0 + 4.0) / 2)
    assert stats["expert_load_min_over_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert stats["expert_load_cv"] == pytest.approx((0.0 + 3.0 ** 0.5) / 2)


def test_minitron_prunes_experts_and_their_widths(ep2_run):
    """The EP=2 checkpoint pruned (at EP=1) to 6 of 8 experts and half the expert widths:
    the pruned model has those sizes, HF's parameter count of them, and a finite loss."""
    from workers import prune_runs

    from megatron_hybrid.checkpoint.dist_checkpoint import read_meta
    from megatron_hybrid.model.config import ModelConfig
    from megatron_hybrid.model.params import count_parameters

    out, _ = ep2_run
    pruned = out.parent / "moe-pruned"
    targets = {"num_moe_experts": 6, "moe_ffn_hidden_size": 16,
               "moe_shared_expert_intermediate_size": 32}
    prune_runs.run("prune", str(prune_runs.RECIPES / "prune.yaml"), *prune_runs.SMALL,
                   "prune.calibration_samples=8", "prune.heldout_samples=8",
                   "model.flavor=tiny-nemotron-3-nano-30b-a3b", "prune.export_config=null",
                   *(f"prune.export_config.{k}={v}" for k, v in targets.items()),
                   "prune.num_moe_experts_divisor=2", "prune.ffn_hidden_size_divisor=16",
                   f"checkpoint.load={out}/checkpoints/step_{STEPS:06d}", f"output_dir={pruned}")
    report = json.loads((pruned / "prune_report.json").read_text())
    assert report["sizes"] == {"num_moe_experts": [8, 6], "moe_ffn_hidden_size": [32, 16],
                               "moe_shared_expert_intermediate_size": [64, 32]}
    model = ModelConfig(**read_meta(pruned / "checkpoints" / "step_000000")["model"])
    assert {k: getattr(model, k) for k in targets} == targets
    assert report["params"][1] == count_parameters(model)["total"] < report["params"][0]
    assert all(loss == loss and loss < 10 for loss in report["heldout_loss"])


def test_pruning_below_the_routed_experts_is_refused_in_one_line():
    from megatron_hybrid.errors import ConfigError
    from megatron_hybrid.model.flavors import get_flavor
    from megatron_hybrid.stages.config import PruneConfig

    options = PruneConfig(export_config={"num_moe_experts": 1}, num_moe_experts_divisor=1)
    with pytest.raises(ConfigError, match=r"num_moe_experts=1 is fewer than the 2 experts each "
                                          r"token is routed to \(model.moe_router_topk\)"):
        options.check_against(get_flavor("tiny-nemotron-3-nano-30b-a3b"))
