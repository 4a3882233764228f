"""The memory / step-time planner against the real model, the published claims, and memory
measured on the CPU.

- parameter counts per stage equal the Megatron-Core model's (built on meta);
- mixture of experts: routed experts split over EP x expert TP and their optimizer state over
  the expert-data-parallel group, MFU from the active experts' FLOPs, the all-to-all volume by
  hand, and the published Nemotron 3 Nano recipes' verdicts on one 8x H100 node;
- serving 128k tokens: nano-v2-9b fits one A10G in bf16, nano-v2-12b does not (its weights
  alone are too big); Nemotron-H-8B's KV cache is a small fraction of an all-attention twin's;
- every CPU run docs/planner.md quotes, single-process and PP=2 (a 2-rank torchrun of this
  file), is planned within ``PEAK_TOLERANCE`` of the CPU allocator's measured peak, and the
  table quotes this revision's numbers (``python tests/planning/test_plan.py --write-docs``
  rewrites it).
"""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # this file as its own torchrun worker: conftest lives in tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import rank_environment  # noqa: E402

from megatron_hybrid import backends, recipe
from megatron_hybrid.model.flavors import get_flavor
from megatron_hybrid.cli.planning import COMMANDS
from megatron_hybrid.planning import planner

PLAN = COMMANDS["plan"]

GIB = 2**30
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
A10G = planner.GPUS["a10g"]
CONTEXT_128K = 131072


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    PLAN.add_arguments(parser)
    code = PLAN.run(parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


# -- parameters --------------------------------------------------------------------------------

MOE_HYBRID = get_flavor("tiny-hybrid").replace(pattern="M*-E", num_moe_experts=4,
                                                moe_ffn_hidden_size=48)
COUNTED = {name: get_flavor(name) for name in ("nano-v2-9b", "nano-v2-12b", "nemotron-h-8b",
                                               "tiny-nano-v2-12b", "nemotron-3-nano-30b-a3b",
                                               "tiny-nemotron-3-nano-30b-a3b")}
COUNTED["moe"] = MOE_HYBRID
PARALLEL_HEADS = get_flavor("tiny-hybrid").replace(pattern="MH-*H-", kv_channels=32,
                                                   num_meta_tokens=2)
"""Hymba's layers (attention as wide as the Mamba heads) and meta tokens."""
COUNTED["parallel-heads"] = PARALLEL_HEADS


@pytest.fixture(scope="module")
def counted():
    backends.install("cpu")
    from megatron_hybrid.model.params import count_parameters

    return {name: count_parameters(cfg) for name, cfg in COUNTED.items()}


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_parameter_counts_match_the_megatron_model(counted, name):
    cfg, counts = COUNTED[name], counted[name]
    assert planner.total_parameters(cfg) == counts["total"]
    assert planner.active_parameters(cfg) == counts["active"]
    per_layer = [sum(planner.layer_parameters(cfg, s)) for s in cfg.layer_pattern.layers]
    assert per_layer == counts["per_layer"]


def test_memory_plans_refuse_parallel_heads_in_one_line():
    layout = planner.TrainingLayout(seq_length=64)
    for plan in (lambda: planner.training_memory(PARALLEL_HEADS, layout),
                 lambda: planner.inference_memory(PARALLEL_HEADS, context=64)):
        with pytest.raises(planner.PlanError, match=r"^plan counts parallel-heads \('H'\) "
                                                    r"layers' parameters but [^\n]*$"):
            plan()


def test_pipeline_stages_hold_their_layers_and_the_ends(counted):
    cfg = get_flavor("tiny-nano-v2-12b")  # '|' marks stages of 18 and 17 layers
    first, last = planner.stage_parameters(cfg, tp=1, pp=2)
    per_layer = counted["tiny-nano-v2-12b"]["per_layer"]
    embedding = cfg.vocab_size * cfg.hidden_size
    assert first == (sum(per_layer[:18]) + embedding, 0)  # (dense, routed experts)
    assert last == (sum(per_layer[18:]) + embedding + cfg.hidden_size, 0)
    assert sum(first) + sum(last) == planner.total_parameters(cfg)


# -- the published claims ----------------------------------------------------------------------

def test_nano_v2_9b_serves_128k_on_one_a10g_and_12b_does_not():
    nine, twelve = (planner.inference_memory(get_flavor(name), context=CONTEXT_128K)
                    for name in ("nano-v2-9b", "nano-v2-12b"))
    # Nemotron Nano 2 (arXiv 2508.14444): bf16 weights ~16.6 GiB (9B) and ~22.9 GiB (12B), ~2 GiB
    # of KV cache at 128k (4 attention layers).
    assert nine.weights / GIB == pytest.approx(16.6, abs=0.1)
    assert twelve.weights / GIB == pytest.approx(22.9, abs=0.1)
    assert nine.kv_cache / GIB == pytest.approx(2.0, abs=0.05)
    assert nine.total < A10G.usable_bytes < twelve.weights
    assert nine.ssm_state < nine.kv_cache / 10  # fixed-size state, small beside the KV cache


def test_plan_cli_answers_the_a10g_question(capsys):
    answers = {}
    for name in ("nano-v2-9b", "nano-v2-12b"):
        code, out = run_cli("--flavor", name, "--gpu", "a10g", "--json", capsys=capsys)
        assert code == 0
        answers[name] = json.loads(out)["inference"]
    assert answers["nano-v2-9b"]["fits"] and not answers["nano-v2-12b"]["fits"]
    assert answers["nano-v2-9b"]["context"] == CONTEXT_128K  # the model's own length
    _, text = run_cli("--flavor", "nano-v2-12b", "--gpu", "a10g", capsys=capsys)
    assert "does NOT fit" in text and "NVIDIA A10G" in text


def test_nemotron_h_8b_kv_cache_is_a_small_fraction_of_an_all_attention_models():
    hybrid = get_flavor("nemotron-h-8b")
    twin = planner.all_attention_counterpart(hybrid)
    assert twin.layer_pattern.counts["*"] == 28 and twin.num_layers == hybrid.num_layers
    ratio = (planner.inference_memory(hybrid, context=CONTEXT_128K).kv_cache
             / planner.inference_memory(twin, context=CONTEXT_128K).kv_cache)
    assert ratio == pytest.approx(4 / 28)  # 4 attention layers where the twin has 28


def test_long_context_recipe_fits_one_h100_node(capsys):
    path = RECIPES / "nemotron_nano_v2" / "long_context_128k.yaml"
    code, out = run_cli(str(path), "--gpus", "8", "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["layout"]["seq_length"] == 131072
    assert (report["layout"]["tp"], report["layout"]["cp"], report["layout"]["dp"]) == (4, 2, 1)
    assert report["training"]["fits"]
    # Its full recompute is what makes the 64k-token shards fit.
    code, out = run_cli(str(path), "train.recompute=none", "--gpus", "8", "--json",
                        capsys=capsys)
    assert not json.loads(out)["training"]["fits"]


def test_plan_needs_one_model_source(capsys):
    with pytest.raises(planner.PlanError, match="give a recipe or --flavor"):
        run_cli(capsys=capsys)
    with pytest.raises(planner.PlanError, match="not both"):
        run_cli(str(RECIPES / "tiny" / "pretrain.yaml"), "--flavor", "nano-v2-9b",
                capsys=capsys)


# -- step time -----------------------------------------------------------------------------------

def test_step_estimate_pays_for_the_pipeline_bubble_and_recompute():
    cfg = get_flavor("nemotron-h-8b")
    peak = planner.GPUS["h100"].peak_flops("bf16")
    base = planner.TrainingLayout(seq_length=8192, tp=2, pp=2, num_microbatches=6)
    step = planner.step_estimate(cfg, base, peak)
    assert step.mfu == pytest.approx(planner.KERNEL_EFFICIENCY * 6 / 7)
    recomputed = planner.step_estimate(cfg, dataclasses.replace(base, recompute="full"), peak)
    assert recomputed.seconds > 1.25 * step.seconds and recomputed.mfu < step.mfu


# -- mixture of experts ------------------------------------------------------------------------

NANO3 = get_flavor("nemotron-3-nano-30b-a3b")
NANO3_PRETRAIN = RECIPES / "nemotron_3_nano" / "pretrain.yaml"
NANO3_SFT = RECIPES / "nemotron_3_nano" / "sft.yaml"


def moe_layout(**overrides) -> planner.TrainingLayout:
    """Nemotron 3 Nano's pretraining shape on one 8-GPU node (TP 4 x DP 2, EP 8)."""
    layout = dict(seq_length=8192, tp=4, dp=2, ep=8, etp=1, sequence_parallel=True,
                  distributed_optimizer=True, micro_batch_size=2, num_microbatches=4)
    return planner.TrainingLayout(**{**layout, **overrides})


def test_expert_parameters_split_over_ep_times_etp_and_the_rest_does_not():
    counts = {(ep, etp): planner.stage_parameters(NANO3, tp=2, pp=1, ep=ep, etp=etp)[0]
              for ep, etp in ((1, 1), (8, 1), (4, 2))}
    routed = NANO3.layer_pattern.counts["E"] * 128 * 2 * 2688 * 1856
    assert counts[1, 1].experts == routed and routed > 0.9 * planner.total_parameters(NANO3)
    assert counts[8, 1].experts == counts[4, 2].experts == routed // 8
    assert counts[1, 1].dense == counts[8, 1].dense == counts[4, 2].dense
    # The non-expert part is TP's: tp=2 holds half the sharded weights of tp=1.
    assert planner.stage_parameters(NANO3, tp=1, pp=1, ep=8, etp=1)[0].dense > 1.8 * counts[
        8, 1].dense


def test_expert_state_shards_over_the_expert_data_parallel_group():
    one, eight = (planner.training_memory(NANO3, moe_layout(ep=ep)) for ep in (1, 8))
    assert eight.experts["parameters"] == pytest.approx(one.experts["parameters"] / 8)
    assert eight.experts["gradients"] == pytest.approx(one.experts["gradients"] / 8)
    # EP=1: 8 expert-data-parallel ranks shard the experts' optimizer; EP=8: 1 rank holds it.
    assert eight.experts["optimizer"] == pytest.approx(one.experts["optimizer"])
    assert moe_layout(ep=8).expert_dp == 1 and moe_layout(ep=1).expert_dp == 8
    routed_per_rank = planner.stage_parameters(NANO3, tp=4, pp=1, ep=8, etp=1)[0].experts
    assert eight.experts == pytest.approx({"parameters": 2 * routed_per_rank,
                                           "gradients": 4 * routed_per_rank,
                                           "optimizer": 12 * routed_per_rank})
    # Balanced routing: EP moves the routed copies between ranks, not their number.
    assert eight.activations["moe"] == one.activations["moe"]
    # Two nodes: the expert-data-parallel group doubles and the optimizer halves.
    two_nodes = planner.training_memory(NANO3, moe_layout(dp=4, num_microbatches=2))
    assert two_nodes.experts["optimizer"] == pytest.approx(eight.experts["optimizer"] / 2)


def test_moe_mfu_counts_the_active_experts_not_all():
    from megatron_hybrid.engine import metrics

    layout, peak = moe_layout(), planner.GPUS["h100"].peak_flops("bf16")
    step = planner.step_estimate(NANO3, layout, peak)
    tokens = step.tokens_per_second_per_gpu * step.seconds
    active = metrics.flops_per_token(NANO3, layout.seq_length)["total"]
    every_expert = metrics.flops_per_token(NANO3.replace(moe_router_topk=128),
                                           layout.seq_length)["total"]
    assert step.mfu == pytest.approx(active * tokens / (step.seconds * peak))
    # Counting every expert's FLOPs would claim several times the MFU for the same step.
    assert every_expert * tokens / (step.seconds * peak) > 9 * step.mfu  # 9.09x at 8192


def test_all_to_all_volume_by_hand():
    cfg = get_flavor("tiny-nemotron-3-nano-30b-a3b")  # h 64, top-2 of 8 experts, 7 MoE layers
    layout = planner.TrainingLayout(seq_length=256, tp=2, dp=2, ep=4, etp=1,
                                    sequence_parallel=True, micro_batch_size=2,
                                    num_microbatches=3)
    exchange = planner.expert_exchange(cfg, layout)
    # 512 tokens / 2 (sequence parallel) x top-2 = 512 routed rows; 3 of 4 leave the rank;
    # 64 bf16 values each.
    one = 512 * 3 / 4 * 64 * 2
    assert exchange.per_all_to_all == one == 49152
    assert exchange.dispatch_forward == exchange.combine_backward == 7 * 3 * one
    assert exchange.total == 4 * 7 * 3 * one and exchange.recompute == 0
    recomputed = planner.expert_exchange(cfg, dataclasses.replace(layout, recompute="full"))
    assert recomputed.total == 6 * 7 * 3 * one
    assert planner.expert_exchange(cfg, dataclasses.replace(layout, ep=1)) is None
    assert planner.expert_exchange(
        cfg, dataclasses.replace(layout, moe_dispatcher="allgather")) is None


def test_experts_that_do_not_split_are_refused_in_one_line(capsys):
    with pytest.raises(planner.PlanError, match=r"ep=3 does not divide the 128 experts") as error:
        planner.training_memory(NANO3, moe_layout(ep=3, dp=3, tp=1, etp=1))
    assert "\n" not in str(error.value)
    from megatron_hybrid.errors import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.ep=3 does not divide model.num_moe_experts"):
        run_cli(str(NANO3_SFT), "parallel.ep=3", "train.global_batch_size=96", "--gpus", "24",
                capsys=capsys)


def test_published_moe_recipes_on_one_h100_node(capsys):
    plans = {}
    for path in (NANO3_PRETRAIN, NANO3_SFT):
        code, out = run_cli(str(path), "--gpus", "8", "--json", capsys=capsys)
        plans[path.stem] = json.loads(out)["training"]
        assert code == 0
    # One node: expert data parallel is 1, every GPU keeps its 16 experts' whole Adam state,
    # and the published micro-batches do not fit; the plan names what does (the recipes'
    # comments quote these figures).
    pretrain, sft = plans["pretrain"], plans["sft"]
    assert not pretrain["fits"] and pretrain["total"] / GIB == pytest.approx(85.7, abs=0.1)
    assert pretrain["fits_with"]["change"] == "train.micro_batch_size=1"
    assert pretrain["fits_with"]["total"] / GIB == pytest.approx(76.8, abs=0.1)
    assert not sft["fits"] and sft["total"] / GIB == pytest.approx(86.4, abs=0.1)
    assert sft["fits_with"] == {"change": "--gpus 16", "total": pytest.approx(64.4 * GIB,
                                                                               abs=0.1 * GIB)}
    # Micro-batch 2 x 8192 tokens over sequence parallel's 4 ranks, 6 copies each, 7/8 leave.
    assert pretrain["all_to_all"]["per_all_to_all"] == 2 * 8192 / 4 * 6 * 7 / 8 * 2688 * 2
    _, out = run_cli(str(NANO3_SFT), "parallel.tp=2", "parallel.sequence_parallel=true",
                     "--gpus", "8", "--json", capsys=capsys)
    one_node = json.loads(out)["training"]
    assert one_node["fits"] and one_node["total"] / GIB == pytest.approx(75.6, abs=0.1)
    _, out = run_cli(str(NANO3_PRETRAIN), "--gpus", "16", "--json", capsys=capsys)
    two_nodes = json.loads(out)["training"]
    assert two_nodes["fits"] and two_nodes["total"] / GIB == pytest.approx(63.7, abs=0.1)
    _, out = run_cli(str(NANO3_SFT), "--json", capsys=capsys)  # one node: what EP=8 needs
    assert json.loads(out)["layout"]["dp"] == 8
    _, text = run_cli(str(NANO3_PRETRAIN), "--gpus", "8", capsys=capsys)
    assert "of which routed experts" in text and "expert all-to-all (ep 8" in text
    assert "fits with train.micro_batch_size=1:" in text


# -- measured on the CPU -------------------------------------------------------------------------

PLANNER_DOCS = Path(__file__).resolve().parents[2] / "docs" / "planner.md"
TINY_PRETRAIN = RECIPES / "tiny" / "pretrain.yaml"
PEAK_TOLERANCE = 0.06
"""Planned / measured stays within 1 +- this: measured 0.991 to 1.033 over every row, in the
table before this revision's kernels and in this one's (the probe makes the layers' activations
exact at the probed shape, so what is left is the accounting around them)."""
DOCS_DRIFT = 0.02
"""The table's figures against this run's: the allocator counts tensor bytes, which do not
depend on the thread count (2 threads and 1 gave the same to 0.01 MiB), so a larger change means
a stale table."""


@dataclasses.dataclass(frozen=True)
class MeasuredRun:
    label: str
    """The row's name in docs/planner.md."""
    overrides: tuple[str, ...] = ()
    """Of the tiny pretrain recipe."""
    stage: int = 0
    """The pipeline stage whose peak the row quotes."""

    @property
    def pipelined(self) -> bool:
        return "parallel.pp=2" in self.overrides


PIPELINED = ("parallel.pp=2", "train.global_batch_size=16")
RECIPE_RUN = MeasuredRun("tiny pretrain recipe (seq 256, micro-batch 4 x 2), no recompute")
FULL_RECOMPUTE_RUN = MeasuredRun("the same, full recompute", ("train.recompute=full",))
MEASURED_RUNS = [
    RECIPE_RUN,
    MeasuredRun("the same, selective recompute", ("train.recompute=selective",)),
    FULL_RECOMPUTE_RUN,
    MeasuredRun("seq 64, micro-batch 1", ("train.seq_length=64", "train.micro_batch_size=1",
                                          "train.global_batch_size=2")),
    MeasuredRun("tiny-hybrid, seq 256, micro-batch 2",
                ("model.flavor=tiny-hybrid", "train.micro_batch_size=2",
                 "train.global_batch_size=4")),
    MeasuredRun("one Mamba layer, full recompute", ("model.pattern=M", "train.recompute=full")),
    MeasuredRun("one MLP layer, full recompute", ('model.pattern="-"', "train.recompute=full")),
    MeasuredRun("PP=2 (2 ranks), micro-batch 4 x 4: stage 0 (2 in flight)", PIPELINED, 0),
    MeasuredRun("PP=2: stage 1 (1 in flight, output and loss)", PIPELINED, 1),
    MeasuredRun("PP=2, full recompute: stage 0", (*PIPELINED, "train.recompute=full"), 0),
    MeasuredRun("PP=2, full recompute: stage 1", (*PIPELINED, "train.recompute=full"), 1),
]
"""Every CPU run the planner's docs quote; PP=2 runs are measured in one 2-rank torchrun."""


def run_config(run: MeasuredRun):
    cfg = recipe.load_recipe(TINY_PRETRAIN, list(run.overrides))
    return cfg, planner.TrainingLayout.from_run(cfg, world_size=cfg.parallel.pp)


def train_tiny_steps(cfg, layout: planner.TrainingLayout, steps: int = 2) -> None:
    """The recipe's model (this rank's stage) through the training engine (DDP, Adam, 1F1B
    schedule), two steps so the optimizer state exists."""
    import torch

    from megatron_hybrid.engine import training_step
    from megatron_hybrid.model.build import ModelLayout, build_model

    model = build_model(cfg, ModelLayout(pp=layout.pp, recompute=layout.recompute),
                        backend="cpu")
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")]
    optimizer = training_step.build_optimizer(chunks, training_step.OptimizerSettings())
    shape = (layout.micro_batch_size, layout.seq_length)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, cfg.vocab_size, (shape[0], shape[1] + 1),
                                   generator=generator)
            yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                   "loss_mask": torch.ones(shape),
                   "position_ids": torch.arange(shape[1]).expand(shape)}

    data = batches()
    for _ in range(steps):
        training_step.train_step(chunks, optimizer, data, num_microbatches=layout.num_microbatches,
                          micro_batch_size=layout.micro_batch_size, seq_length=layout.seq_length)


def measure_peaks(runs: list[MeasuredRun], stage: int) -> dict[str, int]:
    """Measured peak bytes of ``runs`` that quote ``stage``, trained in this process (which
    holds that stage)."""
    from megatron_hybrid.parallel import process_groups

    import torch

    peaks = {}
    for run in runs:
        if run.stage == stage:
            cfg, layout = run_config(run)
            process_groups.seed_everything(0)
            # Megatron-Core's fused functions are torch.compile'd; a process that has already
            # compiled them for many shapes (the whole suite) falls back to eager, which keeps
            # more temporaries (one MLP layer under full recompute: 19.4 MB, not 15.5 MB).
            # Each run is measured as a fresh process would run it.
            torch.compiler.reset()
            _, peaks[run.label] = planner.measure_cpu_peak(lambda: train_tiny_steps(cfg.model,
                                                                                 layout))
    return peaks


def measure_every_run(out_dir: Path) -> dict[str, tuple[int, float]]:
    """(measured, planned) bytes of every ``MEASURED_RUNS`` row: the single-process rows here
    (process groups already set up), the PP=2 rows in a 2-rank torchrun of this file."""
    worker = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", __file__, "--pipeline-worker",
                             str(out_dir)], capture_output=True, text=True, timeout=900,
                            env=rank_environment(2))
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-4000:]
    measured = measure_peaks([run for run in MEASURED_RUNS if not run.pipelined], stage=0)
    for rank in (0, 1):
        measured.update(json.loads((out_dir / f"peaks-rank{rank}.json").read_text()))
    rows = {}
    for run in MEASURED_RUNS:
        cfg, layout = run_config(run)
        planned = planner.stage_memories(cfg.model, layout, kernels="cpu")[run.stage].total
        rows[run.label] = (measured[run.label], planned)
    return rows


def pipeline_worker(out_dir: Path) -> None:
    """torchrun rank of a PP=2 world: this stage's measured peaks of the PP=2 rows."""
    import os

    from megatron_hybrid.parallel import process_groups

    backends.install("cpu")
    process_groups.init_distributed(process_groups.ParallelDims(pp=2, world_size=2), backend="cpu")
    rank = int(os.environ["RANK"])
    peaks = measure_peaks([run for run in MEASURED_RUNS if run.pipelined], stage=rank)
    (out_dir / f"peaks-rank{rank}.json").write_text(json.dumps(peaks))
    process_groups.destroy_distributed()


DOCS_ROW = re.compile(r"^\| (.+?) \| ([\d.]+) MiB \| ([\d.]+) MiB \| ([\d.]+) \|$", re.M)


def docs_table(rows: dict[str, tuple[int, float]]) -> str:
    lines = ["| run (fp32, tiny-nano-v2-12b unless named) | measured peak | planned | "
             "planned / measured |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {measured / planner.MIB:.2f} MiB | {planned / planner.MIB:.2f} MiB | "
              f"{planned / measured:.3f} |" for label, (measured, planned) in rows.items()]
    return "\n".join(lines)


def quoted_rows() -> dict[str, tuple[float, float]]:
    """(measured, planned) bytes per row of docs/planner.md's measured table."""
    block = PLANNER_DOCS.read_text().split("<!-- measured:begin -->")[1].split(
        "<!-- measured:end -->")[0]
    return {label: (float(measured) * planner.MIB, float(planned) * planner.MIB)
            for label, measured, planned, _ in DOCS_ROW.findall(block)}


@pytest.fixture(scope="module")
def process_group():
    backends.install("cpu")
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    yield
    process_groups.destroy_distributed()


def test_every_quoted_cpu_run_is_planned_within_tolerance_of_its_measured_peak(process_group,
                                                                               tmp_path):
    rows = measure_every_run(tmp_path)
    print(docs_table(rows))  # shown when the test fails: this run's table
    quoted = quoted_rows()
    assert list(quoted) == list(rows)  # the docs quote exactly the runs measured here
    for label, (measured, planned) in rows.items():
        assert planned == pytest.approx(measured, rel=PEAK_TOLERANCE), label
        assert quoted[label] == pytest.approx((measured, planned), rel=DOCS_DRIFT), (
            f"{label}: docs/planner.md is stale; rewrite it with python "
            "tests/planning/test_plan.py --write-docs")
    # Activations dominate the recipe's run and full recompute removes most of them: both
    # regimes of the activation model are exercised.
    assert rows[FULL_RECOMPUTE_RUN.label][0] < 0.3 * rows[RECIPE_RUN.label][0]


def write_docs() -> None:
    """Measure every quoted run and rewrite the table in docs/planner.md."""
    import tempfile

    from megatron_hybrid.parallel import process_groups

    backends.install("cpu")
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        table = docs_table(measure_every_run(Path(out_dir)))
    process_groups.destroy_distributed()
    text = PLANNER_DOCS.read_text()
    start, end = text.index("<!-- measured:begin -->\n"), text.index("<!-- measured:end -->")
    PLANNER_DOCS.write_text(text[:start] + "<!-- measured:begin -->\n" + table + "\n"
                            + text[end:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pipeline-worker"]:
        pipeline_worker(Path(sys.argv[2]))
    elif sys.argv[1:] == ["--write-docs"]:
        write_docs()
    else:
        sys.exit("usage: python tests/planning/test_plan.py --write-docs")
