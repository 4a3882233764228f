"""The pipeline runner on a two-stage tiny pipeline (train -> train from the first's checkpoint),
then a quantize stage of the second's model.

- killed (SIGKILL) in the middle of its second stage and run again, it skips the finished
  stage, resumes the killed one from its last checkpoint, and writes the report;
- a stage reads its input by stage name: the second stage loads the first's final checkpoint;
- the report opens with the final model, names the data of every held-out loss and gives
  every task accuracy its right answers and 95% interval;
- --dry-run prints the plan and writes nothing; --only / --from select stages;
- bad pipeline files are refused in one line before anything runs;
- a quantize stage (run alone, --only) measures bf16, fp8 and nvfp4 side by side, saves and
  exports nvfp4, and the report gains a quantization section.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported (the planner's quantized memory)
from megatron_hybrid import mcore  # noqa: E402, F401  (faulthandler before capture)
from megatron_hybrid.cli.pipeline import COMMANDS  # noqa: E402
from megatron_hybrid.pipeline import report, runner  # noqa: E402
from megatron_hybrid.pipeline.runner import PipelineError  # noqa: E402
from megatron_hybrid.stages import common, task  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pretrain.yaml"
SMALL = ["model.flavor=tiny", "model.vocab_size=1024", "train.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=3",
         "train.log_interval=1", "scheduler.warmup_steps=0", "logging.progress_bar=off"]
SECOND_STEPS = 8
PIPELINE = COMMANDS["pipeline"]
RUNNER = ("import sys; from megatron_hybrid import cli; "
          "raise SystemExit(cli.main(['pipeline', *sys.argv[1:]]))")


def two_stages(directory: Path) -> Path:
    """first (3 steps, no task metric) -> second (8 steps, a checkpoint every 2, from first's
    checkpoint, 2 task problems)."""
    stages = [
        {"name": "first", "kind": "train", "recipe": str(RECIPE), "overrides": SMALL,
         "task_samples": 0},
        {"name": "second", "kind": "train", "recipe": str(RECIPE),
         "overrides": [*SMALL, f"train.max_steps={SECOND_STEPS}", "checkpoint.save_interval=2"],
         "inputs": {"checkpoint.load": "first"}},
    ]
    return write_pipeline(directory, {"pipeline": "two", "task_samples": 2, "stages": stages})


QUANTIZE = {"name": "quantize", "kind": "quantize", "recipe": str(RECIPE),
            "overrides": [*SMALL, "quant.format=nvfp4", "quant.compare=[fp8]",
                          "quant.calibration_samples=2", "quant.heldout_samples=2"],
            "inputs": {"checkpoint.load": "second"}}


def with_quantize(directory: Path) -> Path:
    """``two_stages`` and a quantize stage of second's model (2 task problems per format)."""
    content = json.loads(two_stages(directory).read_text())
    return write_pipeline(directory, {**content, "stages": [*content["stages"], QUANTIZE]})


def write_pipeline(directory: Path, content: dict) -> Path:
    path = directory / "pipeline.yaml"
    path.write_text(json.dumps(content))  # JSON is YAML
    return path


def command(path: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-c", RUNNER, str(path), "--output", str(out), *flags]


def run_in_process(path: Path, out: Path, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    PIPELINE.add_arguments(parser)
    return PIPELINE.run(parser.parse_args([str(path), "--output", str(out), *flags]))


def one_line_error(path: Path, out: Path, *flags: str) -> str:
    with pytest.raises(PipelineError) as info:
        run_in_process(path, out, *flags)
    message = str(info.value)
    assert "\n" not in message, message
    assert not out.exists()  # refused before anything was written
    return message


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The two-stage pipeline killed in its second stage, then run again to the end."""
    directory = tmp_path_factory.mktemp("pipeline")
    path, out = two_stages(directory), directory / "out"
    process = subprocess.Popen(command(path, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "second" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text() >= "step_000002"):
        assert process.poll() is None and time.time() < deadline, "pipeline ended before the kill"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the runner and its stage process
    process.wait()
    killed_at = latest.read_text()
    first_log = (out / "first" / runner.LOG).read_text()
    again = subprocess.run(command(path, out), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return {"path": path, "out": out, "killed_at": killed_at, "first_log": first_log,
            "stdout": again.stdout}


def test_killed_stage_resumes_and_finished_stage_is_skipped(resumed):
    out, killed_at = resumed["out"], resumed["killed_at"]
    assert killed_at < f"step_{SECOND_STEPS:06d}", "killed too late to test a resume"
    assert f"first: finished ({out / 'first' / 'DONE'}), skipped" in resumed["stdout"]
    assert f"second: will resume from {killed_at}" in resumed["stdout"]
    assert (out / "first" / runner.LOG).read_text() == resumed["first_log"]  # not run again
    second_log = (out / "second" / runner.LOG).read_text()
    assert f"resuming from {out / 'second' / 'checkpoints' / killed_at}" in second_log
    steps = {json.loads(line)["step"] for line in
             (out / "second" / "metrics.jsonl").read_text().splitlines()}
    assert steps >= set(range(1, SECOND_STEPS + 1))


def test_stage_reads_its_input_by_stage_name(resumed):
    out = resumed["out"]
    first = json.loads((out / "first" / "DONE").read_text())
    second = json.loads((out / "second" / "DONE").read_text())
    assert first["checkpoint"] == "checkpoints/step_000003"
    assert second["checkpoint"] == f"checkpoints/step_{SECOND_STEPS:06d}"
    second_log = (out / "second" / runner.LOG).read_text()
    assert f"initial weights from {out / 'first' / 'checkpoints' / 'step_000003'}" in second_log
    assert f"checkpoint.load={out / 'first' / 'checkpoints' / 'step_000003'}" in " ".join(
        second["command"])


def test_report_has_every_stage_with_parameters_losses_and_plots(resumed):
    out = resumed["out"]
    text = (out / "report.md").read_text()
    assert f"report: {out / 'report.md'}" in resumed["stdout"]
    assert "2 of 2 stages finished" in text
    rows = [line for line in text.splitlines() if line.startswith("| first |")
            or line.startswith("| second |")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert int(cells[2].replace(",", "")) > 100_000  # parameters of the tiny flavor
        assert 0 < float(cells[3]) < 10  # held-out loss from the final eval
        assert cells[4] == report.HELDOUT_DATA["train"]  # and the data it was measured on
    for png in ("loss_curves.png", "parameters.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    assert "[loss.png](second/loss.png)" in text


def test_a_stage_model_answers_its_count_of_task_problems(resumed):
    out = resumed["out"]
    assert not (out / "first" / report.TASK_METRICS).exists()  # its task_samples: 0
    assert "evaluate" not in (out / "first" / runner.LOG).read_text()
    scored = json.loads((out / "second" / report.TASK_METRICS).read_text())
    assert set(scored["tally"]) == {"accuracy /think", "accuracy /no_think"}
    assert all(asked == 2 and 0 <= correct <= 2 for correct, asked in scored["tally"].values())
    assert scored["seconds"] > 0
    assert f"evaluate {out / 'second' / 'checkpoints'}" in (out / "second" / runner.LOG
                                                          ).read_text()
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| second |"))
    for name, (correct, asked) in scored["tally"].items():
        low, high = task.wilson_interval(correct, asked)
        assert (f"{name} {correct / asked:.1%} ({correct}/2, 95% CI {low:.1%}-{high:.1%})"
                in row)
    assert f"(task {scored['seconds']:.0f} s)" in row


def test_report_opens_with_the_final_model(resumed):
    text = (resumed["out"] / "report.md").read_text()
    section = text.split("## Final model: second (the last stage)\n", 1)[1].split("\n## ")[0]
    assert "- parameters: " in section and "pattern `" in section
    assert f"on {report.HELDOUT_DATA['train']}" in section
    assert "- task accuracy /think: " in section and "- task accuracy /no_think: " in section
    row = {"stage": "sft", "params": 10, "pattern": "M-", "heldout_loss": None, "tally": {}}
    assert report.final_model_section(row, last_stage="distill")[0] == (
        "## Latest model: sft (the last stage, distill, has not finished)")


def test_a_stage_summary_and_report_give_its_heldout_loss_data_and_task_metrics(resumed,
                                                                                 tmp_path):
    out = tmp_path / "out"  # a copy: the other tests read the run as the pipeline left it
    shutil.copytree(resumed["out"], out, symlinks=True)
    common.write_summary(out / "second", heldout_loss=1.5, task_metrics={"accuracy": 0.25})
    (out / "second" / "train_report.json").write_text(json.dumps({"heldout_data": "poems"}))
    text = report.write_report(runner.load_pipeline(resumed["path"], str(out))).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| second |"))
    assert "| 1.5000 | poems | accuracy 0.25, accuracy /think " in row
    assert "- held-out loss: 1.5000 on poems" in text


@pytest.fixture(scope="module")
def quantized(resumed, tmp_path_factory):
    """The finished two-stage run (a copy) with its quantize stage run alone (--only)."""
    directory = tmp_path_factory.mktemp("quantized")
    out = directory / "out"
    shutil.copytree(resumed["out"], out, symlinks=True)
    path = with_quantize(directory)
    result = subprocess.run(command(path, out, "--only", "quantize"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out, "stdout": result.stdout,
            "report": json.loads((out / "quantize" / "quantize_report.json").read_text())}


def test_a_quantize_stage_measures_each_format_and_exports_the_chosen_one(quantized):
    out, measured = quantized["out"], quantized["report"]
    assert f"second: finished ({out / 'second' / 'DONE'}), skipped" in quantized["stdout"]
    assert json.loads((out / "quantize" / "DONE").read_text())["checkpoint"] == \
        "checkpoints/nvfp4"
    assert measured["checkpoint"] == str(out / "second" / "checkpoints" / "step_000008")
    rows = {row["format"]: row for row in measured["rows"]}
    assert list(rows) == ["bf16", "fp8", "nvfp4"]
    assert len({row["heldout_loss"] for row in rows.values()}) == 3
    assert all(asked == 2 for row in rows.values() for _, asked in row["task"].values())
    # the stage answered the problems per format: the runner scored no checkpoint after it
    assert "evaluate" not in (out / "quantize" / runner.LOG).read_text()
    scored = json.loads((out / "quantize" / report.TASK_METRICS).read_text())
    assert scored["tally"] == rows["nvfp4"]["task"]
    meta = json.loads((out / "quantize" / "checkpoints" / "nvfp4" / "meta.json").read_text())
    assert meta["quantization"] == {"format": "nvfp4"}
    quant = json.loads((out / "quantize" / "hf" / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "NVFP4"


def test_the_report_gains_a_quantization_section(quantized):
    out, measured = quantized["out"], quantized["report"]
    text = (out / "report.md").read_text()
    assert "3 of 3 stages finished" in text
    assert "## Final model: quantize (the last stage)" in text
    section = text.split("## Quantization: quantize (second's model, fake-quantized)\n", 1)[1]
    section = section.split("\n## ")[0]
    assert "task accuracy on 2 held-out problems per format" in section
    assert f"`nvfp4` is saved (`{out / 'quantize' / 'checkpoints' / 'nvfp4'}`)" in section
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == ("| format | held-out loss | accuracy /no_think | accuracy /think | "
                        "weights (MiB) | serving 128k (MiB) |")
    weights = {}
    for line, row in zip(table[1:], measured["rows"]):
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        assert cells[:2] == [row["format"], f"{row['heldout_loss']:.4f}"]
        weights[row["format"]] = float(cells[4])
    assert weights["nvfp4"] < weights["fp8"] < weights["bf16"]
    bf16, fp8 = measured["rows"][:2]
    assert (f"- fp8 - bf16: held-out loss {fp8['heldout_loss'] - bf16['heldout_loss']:+.4f}; "
            f"accuracy /think ") in section
    assert section.count("95% CI") == 4  # two formats x two modes against bf16


def test_the_plan_lists_the_quantize_stage(tmp_path, capsys):
    path, out = with_quantize(tmp_path), tmp_path / "out"
    assert run_in_process(path, out, "--dry-run") == 0
    plan = capsys.readouterr().out.split("3. quantize [quantize]: will run\n", 1)[1]
    assert "PTQ in fp8, nvfp4 against bf16: calibration on 2 samples of data" in plan
    assert "serving one 128k sequence: bf16 " in plan
    assert "quant.task_samples=2" in plan  # the pipeline's count, answered in the stage
    assert "evaluate 2 held-out task problems, /think and /no_think, by each format's model" \
        in plan
    assert one_line_error(path, out, "--only", "quantize") == (
        "stage 'quantize' reads stage 'second', which has not finished and is not selected: "
        "run --from second, or the whole pipeline")


def test_the_tiny_plan_lists_its_rl_stage(tmp_path, capsys):
    tiny = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pipeline.yaml"
    assert run_in_process(tiny, tmp_path / "out", "--dry-run") == 0
    plan = capsys.readouterr().out.split("5. grpo [grpo]: will run\n", 1)[1].split("\n6. ")[0]
    assert ("16 steps x 16 prompts x 8 sampled completions (up to 24 tokens) from 32 training "
            "problems, /think and /no_think") in plan
    assert f"checkpoint.load <- dpo ({tmp_path / 'out' / 'dpo' / 'checkpoints' / '<final>'})" \
        in plan
    assert "evaluate 256 held-out task problems" in plan


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    path, out = two_stages(tmp_path), tmp_path / "out"
    result = subprocess.run(command(path, out, "--dry-run"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = result.stdout
    assert "1. first [train]: will run" in plan and "2. second [train]: will run" in plan
    assert f"checkpoint.load <- first ({out / 'first' / 'checkpoints' / '<final>'})" in plan
    assert "tp 1 x pp 1 x cp 1 x dp 1 = world size 1" in plan
    assert f"{SECOND_STEPS} steps x 4 sequences x 64 tokens" in plan
    assert "MiB per rank; the planner times GPU runs only" in plan  # the planner's memory
    assert plan.count("evaluate 2 held-out task problems") == 1  # the first stage's is 0
    assert not out.exists()


def test_only_and_from_select_stages(resumed, tmp_path):
    path, out = two_stages(tmp_path), tmp_path / "out"
    assert run_in_process(path, out, "--only", "first", "--dry-run") == 0
    message = one_line_error(path, out, "--from", "second", "--dry-run")
    assert message == ("stage 'second' reads stage 'first', which has not finished and is not "
                       "selected: run --from first, or the whole pipeline")
    assert "did you mean 'second'?" in one_line_error(path, out, "--only", "secnd")
    finished = subprocess.run(command(resumed["path"], resumed["out"], "--from", "second",
                                      "--dry-run"), capture_output=True, text=True, timeout=300)
    assert "1. first [train]: finished, skipped" in finished.stdout
    assert "2. second [train]: finished, skipped" in finished.stdout


@pytest.mark.parametrize("change, expected", [
    (lambda stages: stages[1].update(kind="trian"),
     "stage 'second': kind 'trian' is unknown: did you mean 'train'? choose one of train"),
    (lambda stages: stages[1].update(inputs={"checkpoint.load": "frist"}),
     "stage 'second': inputs.checkpoint.load: no stage is named 'frist': did you mean 'first'?"),
    (lambda stages: stages[0].update(inputs={"checkpoint.load": "second"}),
     "stage 'first': inputs.checkpoint.load: the inputs form a cycle first -> second -> first"),
    (lambda stages: stages.append({**stages[0], "name": "third"}) or stages[0].update(
        inputs={"checkpoint.load": "third"}),
     "stage 'first': inputs.checkpoint.load: stage 'third' comes later: stages run in file "
     "order, so move 'third' before 'first'"),
    (lambda stages: stages[1].update(name="first"), "two stages are named 'first'"),
    (lambda stages: stages[1].update(recipes="x.yaml"),
     "stage 'second': unknown key 'recipes': did you mean 'recipe'?"),
    (lambda stages: stages[1].update(recipe="missing.yaml"),
     "missing.yaml not found (recipe paths are relative to the pipeline file)"),
    (lambda stages: stages[1].update(nproc=0), "stage 'second': nproc=0 must be a positive"),
    (lambda stages: stages[1].update(task_samples=257),
     "stage 'second': task_samples: give a whole number from 0 (no task metric) to 256, got 257"),
    (lambda stages: stages[1].update(overrides=["train.max_steps=3",
                                                "checkpoint.load=elsewhere"]),
     "stage 'second': checkpoint.load is both an input and an override"),
    (lambda stages: stages[1].update(overrides=["train.max_step=3"]),
     "train.max_step: unknown key; did you mean train.max_steps?"),
    (lambda stages: stages[1].update(kind="quantize"),
     "stage 'second' (" + str(RECIPE) + "): a quantize stage saves and exports quant.format: "
     "set it to fp8 or nvfp4"),
    (lambda stages: stages[1].update(kind="quantize", nproc=2),
     "a quantize stage runs in one process (checkpoints of any layout load), not 2"),
])
def test_bad_pipeline_files_are_one_line_errors(tmp_path, change, expected):
    stages = [
        {"name": "first", "kind": "train", "recipe": str(RECIPE)},
        {"name": "second", "kind": "train", "recipe": str(RECIPE),
         "inputs": {"checkpoint.load": "first"}},
    ]
    change(stages)
    path = write_pipeline(tmp_path, {"pipeline": "bad", "stages": stages})
    assert expected in one_line_error(path, tmp_path / "out")


def test_a_run_recipe_is_not_a_pipeline(tmp_path):
    message = one_line_error(RECIPE, tmp_path / "out")
    assert message == (f"{RECIPE}: not a pipeline file: it needs a top-level 'pipeline: NAME' "
                       f"and 'stages:' (a run recipe goes to megatron-hybrid train)")


@pytest.mark.parametrize("value", [-1, 257, "24", True])
def test_task_samples_out_of_range_is_refused_before_any_stage(tmp_path, value):
    path = write_pipeline(tmp_path, {"pipeline": "bad", "task_samples": value, "stages": [
        {"name": "first", "kind": "train", "recipe": str(RECIPE)}]})
    assert "task_samples: give a whole number from 0 (no task metric) to 256" in \
        one_line_error(path, tmp_path / "out")


def test_compression_section_states_the_fraction_of_the_teacher_kept_and_the_noise():
    teacher_tally = {"accuracy /think": [128, 256], "accuracy /no_think": [40, 100]}
    student_tally = {"accuracy /think": [102, 256], "accuracy /no_think": [40, 100]}
    teacher, student = ({"params": params, "tally": tally, "task_metrics": {
        name: correct / asked for name, (correct, asked) in tally.items()}}
        for params, tally in ((4_000_000, teacher_tally), (2_800_000, student_tally)))
    distilled = {"start": {"student_loss": 0.6}, "end": {"student_loss": 0.52,
                                                         "teacher_loss": 0.5}, "gap_closed": 0.8,
                 "heldout_data": "task conversations"}
    lines = report.compression_lines("dpo", "distill", teacher, student, distilled)
    assert lines[0] == "## Compression: distill (student) vs dpo (teacher)"
    assert "4,000,000 -> 2,800,000: 70.0% of the teacher" in lines[2]
    assert lines[3] == ("- **the student keeps 90% of the teacher's task accuracy** (mean over "
                        "accuracy /think, accuracy /no_think)")
    assert lines[4].startswith("- held-out loss on task conversations: teacher 0.5000")
    assert "recovered 80.0% of the held-out loss that pruning cost" in lines[5]
    assert lines[6].startswith("- accuracy /think: teacher 50.0% (128/256, 95% CI 43.9%-56.1%)"
                               ", student 39.8% (102/256")
    assert "(79.7% of the teacher); student - teacher -10.2% (95% CI" in lines[6]
    assert lines[6].endswith(": the student is worse)")  # 26 of 256 is more than the noise
    assert lines[7].endswith("student - teacher +0.0% (95% CI -13.3% to +13.3%: within the "
                             "noise)")
    gap_too_small = {**distilled, "gap_closed": None, "min_gap": 0.01,
                     "start": {"student_loss": 0.505, "teacher_loss": 0.5}}
    lines = report.compression_lines("dpo", "distill", teacher, student, gap_too_small)
    assert lines[5] == ("- **pruning cost too little held-out loss to measure its recovery** "
                        "(pruned 0.5050 vs teacher 0.5000: a gap of 0.0050 nats, under 0.01): "
                        "compare the task metrics below")


def test_rl_section_gives_the_reward_trend_and_the_accuracy_change(tmp_path):
    from types import SimpleNamespace

    from megatron_hybrid.stages import grpo

    run_dir = tmp_path / "grpo"
    run_dir.mkdir()
    rewards = [[step, 0.30 + 0.01 * step] for step in range(1, 11)]
    (run_dir / f"{grpo.REPORT}.json").write_text(json.dumps(
        {"rewards": rewards, "start": {"accuracy": None}, "end": {"accuracy": None},
         "prompts": 12, "grpo": {"rollout_batch": 4}}))
    pipeline = SimpleNamespace(run_dir=lambda name: tmp_path / name)
    stage = SimpleNamespace(name="grpo", inputs={"checkpoint.load": "dpo"})
    rows = {"dpo": {"tally": {"accuracy /think": [50, 256]}},
            "grpo": {"tally": {"accuracy /think": [90, 256]}}}
    lines = report.rl_section(pipeline, stage, rows)
    assert lines[0] == "## Reinforcement learning: grpo (from dpo)"
    # 3 steps ask the 12 prompts once; step 10 starts a fourth pass, which is left out:
    # (0.31 + 0.32 + 0.33) / 3 and (0.37 + 0.38 + 0.39) / 3
    assert lines[2].startswith("- mean reward over a pass over the 12 prompts 0.320 (steps "
                               "1-3) -> 0.380 (steps 7-9) (")
    assert lines[3].startswith("- accuracy /think: dpo 19.5% (50/256")
    assert "grpo 35.2% (90/256" in lines[3] and lines[3].endswith(": better)")


@pytest.mark.parametrize("budget, nproc, per_rank", [("2", 2, "1"), ("4", 2, "2"), ("1", 4, "1")])
def test_a_stages_ranks_share_the_pipelines_threads(tmp_path, monkeypatch, budget, nproc,
                                                    per_rank):
    monkeypatch.setenv("OMP_NUM_THREADS", budget)
    stage = runner.Stage(name="first", kind="train", recipe=RECIPE)
    plan = runner.StagePlan(stage=stage, run_dir=tmp_path, overrides=[], cfg=None,
                              nproc=nproc, status="run")
    runner._launch(plan, [sys.executable, "-c",
                            "import os; print('threads', os.environ['OMP_NUM_THREADS'])"])
    assert (tmp_path / runner.LOG).read_text().splitlines()[-1] == f"threads {per_rank}"
