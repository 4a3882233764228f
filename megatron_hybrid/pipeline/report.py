"""The pipeline's report: OUTPUT/report.md with PNGs beside it, from what each stage wrote.

For every finished stage the report reads its run directory (OUTPUT/NAME):

- the final checkpoint's ``meta.json``: the model, whose parameters are counted;
- ``metrics.jsonl`` (every training loop writes it): the loss curve, and the held-out loss of
  its last eval record;
- ``summary.json``, the stage's own summary (written with :func:`write_summary`):
  ``{"heldout_loss": float, "task_metrics": {name: float}}``, both optional; its held-out loss
  wins over the one of metrics.jsonl;
- ``task_metrics.json`` (the pipeline runner writes it): the right answers per mode out of the
  held-out task problems asked, shown as accuracies with their Wilson 95% intervals;
- ``KIND_report.json`` (e.g. ``prune_report.json``): its ``heldout_data`` names what the
  held-out loss was measured on; without it the stage kind's usual data is named;
- its PNGs and ``*_report.md`` files, linked (e.g. the prune stage's layer importance plot);
- a distill stage's ``distill_report.json``: how much of the teacher's quality the pruned and
  distilled student recovered, next to the parameter ratio;
- a quantize stage's ``quantize_report.json``: held-out loss, task accuracy and the planner's
  serving memory of its input model in bf16 and each format, side by side.

The report opens with the final model: the last stage's, or the last finished one's, said so.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_hybrid.stages.common import SUMMARY

TASK_METRICS = "task_metrics.json"
"""The task accuracies of a stage's final model (the pipeline runner writes them)."""
REPORT = "report.md"
LOSS_CURVES = "loss_curves.png"
PARAMETERS = "parameters.png"
DISTILL_REPORT = "distill_report.json"
OBJECTIVES = {"train": "LM loss", "sft": "assistant-token loss", "dpo": "DPO loss",
              "distill": "KD loss", "reward-model": "reward-model loss"}
"""What each stage kind's training loss is, for the legend of the loss curves (on a log
scale: GRPO's objective, which can be negative, is drawn by its stage as the reward)."""
PUBLISHED_PAIR = ("nano-v2-12b", "nano-v2-9b")
"""The published compression the tiny pipeline mirrors: its parameter ratio is the yardstick."""
HELDOUT_DATA = {"train": "held-out text of its training data", "sft": "held-out conversations, "
                "assistant tokens", "dpo": "held-out preference pairs (DPO loss)",
                "grpo": "none: RL is measured by its rewards"}
"""What a stage kind's held-out loss is measured on when its report does not say."""


def write_report(pipeline) -> Path:
    """Write ``report.md`` and its PNGs into the pipeline's output folder; return its path."""
    finished = [stage for stage in pipeline.stages if pipeline.is_finished(stage.name)]
    rows = [stage_row(pipeline, stage) for stage in finished]
    out = pipeline.output_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot(rows, out)
    lines = [f"# Pipeline {pipeline.name}", "",
             f"From `{pipeline.path}`: {len(finished)} of {len(pipeline.stages)} stages "
             f"finished (outputs in `{out}`).", ""]
    if rows:
        lines += final_model_section(rows[-1], last_stage=pipeline.stages[-1].name)
    by_name = {row["stage"]: row for row in rows}
    for stage in finished:
        if stage.kind == "grpo" and "checkpoint.load" in stage.inputs:
            lines += rl_section(pipeline, stage, by_name)
        if stage.kind == "distill" and "distill.teacher" in stage.inputs:
            lines += compression_section(pipeline, stage, by_name)
        if stage.kind == "quantize":
            lines += quantization_section(pipeline, stage)
    lines += stages_table(rows) + [f"![{caption}]({name})" for caption, name in plots] + [""]
    lines += stage_outputs(pipeline, finished)
    path = out / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_row(pipeline, stage) -> dict:
    run_dir = pipeline.run_dir(stage.name)
    checkpoint = pipeline.final_checkpoint(stage.name)
    records = _records(run_dir / "metrics.jsonl")
    summary = _json_or_empty(run_dir / SUMMARY)
    evals = [record["loss"] for record in records if record["kind"] == "eval"]
    scored = _json_or_empty(run_dir / TASK_METRICS)
    tally = scored.get("tally", {})
    model = json.loads((checkpoint / "meta.json").read_text())["model"]
    return {
        "stage": stage.name, "kind": stage.kind, "checkpoint": checkpoint,
        "params": count_parameters(model), "pattern": model["pattern"],
        "heldout_loss": _first_given(summary.get("heldout_loss"), evals[-1] if evals else None),
        "heldout_data": _json_or_empty(run_dir / f"{stage.kind}_report.json").get(
            "heldout_data", HELDOUT_DATA.get(stage.kind, "data not named by the stage")),
        "task_metrics": {**summary.get("task_metrics", {}),
                         **{name: correct / asked for name, (correct, asked) in tally.items()}},
        "tally": tally, "task_seconds": scored.get("seconds"),
        "seconds": pipeline.done(stage.name)["seconds"],
        "curve": _latest_per_step([r for r in records if r["kind"] == "train"]),
    }


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def count_parameters(model: dict) -> int:
    from megatron_hybrid.model.config import ModelConfig
    from megatron_hybrid.model.params import count_parameters as count

    return count(ModelConfig(**model))["total"]


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _latest_per_step(records: list[dict]) -> list[tuple[int, float]]:
    """(step, loss); a resumed run logs a step again, and its latest record counts."""
    latest = {record["step"]: record["loss"] for record in records}
    return sorted(latest.items())


# -- sections ---------------------------------------------------------------------------------

def final_model_section(row: dict, *, last_stage: str) -> list[str]:
    """The model the pipeline ends with: the last stage's (or, before it has finished, the
    last finished stage's, said so)."""
    if row["stage"] == last_stage:
        title = f"## Final model: {row['stage']} (the last stage)"
    else:
        title = (f"## Latest model: {row['stage']} (the last stage, {last_stage}, has not "
                 f"finished)")
    lines = [title, "", f"- parameters: {row['params']:,}, pattern `{row['pattern']}`",
             f"- held-out loss: {_loss_text(row)}"]
    lines += [f"- task {name}: {metric_text(row, name)}" for name in row["tally"]]
    return [*lines, ""]


def metric_text(row: dict, name: str) -> str:
    """A task metric: an accuracy from a tally with its right answers and 95% interval, or the
    value a stage reported."""
    from megatron_hybrid.stages.task import wilson_interval

    if name not in row["tally"]:
        return f"{row['task_metrics'][name]:.4g}"
    correct, asked = row["tally"][name]
    low, high = wilson_interval(correct, asked)
    return f"{correct / asked:.1%} ({correct}/{asked}, 95% CI {low:.1%}-{high:.1%})"


def _loss_text(row: dict) -> str:
    if row["heldout_loss"] is None:
        return "n/a"
    return f"{row['heldout_loss']:.4f} on {row['heldout_data']}"


def rl_section(pipeline, stage, rows: dict) -> list[str]:
    """The RL stage's mean reward over its first and last pass over its prompts, and its
    model's task accuracy against the model it started from (the runner's tallies, with the
    difference's interval)."""
    from megatron_hybrid.stages import grpo

    before_name = stage.inputs["checkpoint.load"]
    trend = grpo.reward_trend(grpo.read_report(pipeline.run_dir(stage.name)))
    lines = [f"## Reinforcement learning: {stage.name} (from {before_name})", "",
             f"- {trend} ([{stage.name}/{grpo.REWARD_PLOT}]({stage.name}/{grpo.REWARD_PLOT}))"]
    before, after = rows.get(before_name), rows[stage.name]
    if before is not None:
        lines += [_change_line(name, before_name, before, stage.name, after)
                  for name in after["tally"] if name in before["tally"]]
    return [*lines, ""]


def _change_line(name: str, before_name: str, before: dict, after_name: str,
                 after: dict) -> str:
    change = _difference_text(after["tally"][name], before["tally"][name],
                              better="better", worse="worse")
    return (f"- {name}: {before_name} {metric_text(before, name)}, {after_name} "
            f"{metric_text(after, name)}; change {change}")


def _difference_text(tally: tuple, reference: tuple, *, better: str, worse: str) -> str:
    """``+1.2% (95% CI -3.0% to +5.4%: within the noise)``: an accuracy minus a reference's,
    with the interval that says whether it is more than the noise of the problems asked."""
    from megatron_hybrid.stages.task import difference_interval

    difference, low, high = difference_interval(tally, reference)
    verdict = "within the noise" if low <= 0 <= high else (better if low > 0 else worse)
    return f"{difference:+.1%} (95% CI {low:+.1%} to {high:+.1%}: {verdict})"


def compression_section(pipeline, stage, rows: dict) -> list[str]:
    """Teacher vs pruned-and-distilled student: parameters, held-out loss, task metrics."""
    teacher_name = stage.inputs["distill.teacher"]
    path = pipeline.run_dir(stage.name) / DISTILL_REPORT
    if teacher_name not in rows or not path.is_file():
        return []
    return compression_lines(teacher_name, stage.name, rows[teacher_name], rows[stage.name],
                             json.loads(path.read_text()))


def compression_lines(teacher_name: str, student_name: str, teacher: dict, student: dict,
                      distilled: dict) -> list[str]:
    """The compression section from the two stages' rows (``params``, ``task_metrics``,
    ``tally``) and the distill report (``start``, ``end``, ``gap_closed``, ``heldout_data``)."""
    start, end = distilled["start"], distilled["end"]
    data = distilled.get("heldout_data", "the distillation data")
    ratio, published = student["params"] / teacher["params"], published_ratio()
    kept = {name: value / teacher["task_metrics"][name]
            for name, value in student["task_metrics"].items()
            if teacher["task_metrics"].get(name)}
    lines = [
        f"## Compression: {student_name} (student) vs {teacher_name} (teacher)", "",
        f"- parameters: {teacher['params']:,} -> {student['params']:,}: {ratio:.1%} of the "
        f"teacher (published {PUBLISHED_PAIR[0]} -> {PUBLISHED_PAIR[1]}: {published:.1%})",
    ]
    if kept:
        lines.append(f"- **the student keeps {sum(kept.values()) / len(kept):.0%} of the "
                     f"teacher's task accuracy** (mean over {', '.join(kept)})")
    lines += [
        f"- held-out loss on {data}: teacher {end['teacher_loss']:.4f}, pruned "
        f"{start['student_loss']:.4f}, distilled {end['student_loss']:.4f}",
        _recovery_line(distilled),
        *(_accuracy_line(name, teacher, student, fraction) for name, fraction in kept.items()),
    ]
    return [*lines, ""]


def _accuracy_line(name: str, teacher: dict, student: dict, fraction: float) -> str:
    """Teacher and student on one task metric; with both tallies, the difference and its 95%
    interval, which says whether the gap is more than the noise of the problems asked."""
    line = (f"- {name}: teacher {metric_text(teacher, name)}, student "
            f"{metric_text(student, name)} ({fraction:.1%} of the teacher)")
    if name not in teacher["tally"] or name not in student["tally"]:
        return line
    return line + "; student - teacher " + _difference_text(
        student["tally"][name], teacher["tally"][name], better="the student is better",
        worse="the student is worse")


def _recovery_line(distilled: dict) -> str:
    closed, start = distilled["gap_closed"], distilled["start"]
    if closed is None:  # a gap under the distill report's minimum: no fraction is measurable
        gap = start["student_loss"] - start["teacher_loss"]
        return (f"- **pruning cost too little held-out loss to measure its recovery** (pruned "
                f"{start['student_loss']:.4f} vs teacher {start['teacher_loss']:.4f}: a gap of "
                f"{gap:.4f} nats, under {distilled.get('min_gap', 0.0)}): compare the task "
                f"metrics below")
    return (f"- **the student recovered {_percent(closed)} of the held-out loss that pruning "
            f"cost** (gap to the teacher closed by distillation)")


def quantization_section(pipeline, stage) -> list[str]:
    """The quantize stage's formats side by side (``quantization_lines``)."""
    from megatron_hybrid.quantization import command

    path = pipeline.run_dir(stage.name) / f"{command.REPORT}.json"
    if not path.is_file():
        return []
    return quantization_lines(stage.name, stage.inputs.get("checkpoint.load", "its input"),
                              json.loads(path.read_text()))


def quantization_lines(name: str, source: str, quantized: dict) -> list[str]:
    """The section from a quantize report (``command.run``'s, with ``memory``): the table of
    formats, then each format minus bf16 (held-out loss; task accuracies with the difference's
    interval)."""
    from megatron_hybrid.quantization import command

    rows = quantized["rows"]
    reference, chosen = rows[0], rows[-1]
    asked = {asked for row in rows for _, asked in (row["task"] or {}).values()}
    lines = [f"## Quantization: {name} ({source}'s model, fake-quantized)", "",
             f"ModelOpt PTQ calibrated on {quantized['calibration_samples']} samples; held-out "
             f"loss on {quantized['heldout_samples']} samples ({quantized['heldout_data']})"
             + (f"; task accuracy on {', '.join(map(str, asked))} held-out problems per format"
                if asked else "")
             + f". `{chosen['format']}` is saved (`{quantized['saved']}`) and exported for "
             f"vLLM / TensorRT-LLM (`{quantized['exported']}`). Memory: the planner's, weights "
             f"and serving one {quantized['memory']['context'] // 1024}k sequence.", "",
             *command.table(quantized), ""]
    lines += [_against_reference(row, reference) for row in rows[1:]]
    return [*lines, ""]


def _against_reference(row: dict, reference: dict) -> str:
    """A format minus bf16: held-out loss, and each task accuracy with its interval."""
    changes = [f"; {metric} " + _difference_text(tally, reference["task"][metric],
                                                 better="better", worse="worse")
               for metric, tally in (row["task"] or {}).items()]
    return (f"- {row['format']} - {reference['format']}: held-out loss "
            f"{row['heldout_loss'] - reference['heldout_loss']:+.4f}{''.join(changes)}")


def published_ratio() -> float:
    from megatron_hybrid.model import flavors

    big, small = (count_parameters(flavors.get_flavor(name).to_dict()) for name in PUBLISHED_PAIR)
    return small / big


def stages_table(rows: list[dict]) -> list[str]:
    lines = ["## Stages", "",
             "| stage | kind | parameters | held-out loss | held-out data | task metrics | time "
             "| checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        loss = "n/a" if row["heldout_loss"] is None else f"{row['heldout_loss']:.4f}"
        tasks = ", ".join(f"{name} {metric_text(row, name)}" for name in row["task_metrics"])
        time = f"{row['seconds']:.0f} s" + ("" if row["task_seconds"] is None else
                                            f" (task {row['task_seconds']:.0f} s)")
        lines.append(f"| {row['stage']} | {row['kind']} | {row['params']:,} | {loss} | "
                     f"{row['heldout_data']} | {tasks or 'n/a'} | {time} | "
                     f"`{row['checkpoint']}` |")
    return [*lines, "",
            "Held-out losses on different data do not compare with each other. Time is the "
            "finishing attempt's, the task evaluation included.", ""]


def stage_outputs(pipeline, finished) -> list[str]:
    """What each stage wrote besides checkpoints: its reports linked, its plots shown (its own
    loss plot linked: the curves above hold it)."""
    lines = ["## Stage outputs", ""]
    for stage in finished:
        run_dir = pipeline.run_dir(stage.name)
        files = sorted([*run_dir.glob("*_report.md"), *run_dir.glob("*.png")])
        links = ", ".join(f"[{path.name}]({stage.name}/{path.name})" for path in files)
        lines += [f"### {stage.name}", "", links or "no plots or reports", ""]
        lines += [f"![{stage.name}: {path.stem}]({stage.name}/{path.name})\n" for path in files
                  if path.suffix == ".png" and path.stem != "loss"]
    return lines


# -- plots ------------------------------------------------------------------------------------

def _plot(rows: list[dict], out: Path) -> list[tuple[str, str]]:
    """The loss curves of all stages, one after another, and the parameters per stage."""
    from megatron_hybrid.engine import metrics

    curves, offset = {}, 0
    for row in rows:
        if row["curve"] and row["kind"] in OBJECTIVES:
            label = f"{row['stage']} ({OBJECTIVES.get(row['kind'], 'loss')})"
            curves[label] = [(offset + step, loss) for step, loss in row["curve"]]
            offset += row["curve"][-1][0]
    plots = []
    if curves:
        metrics.plot_curves(curves, out / LOSS_CURVES, title="Training objective per stage",
                            xlabel="step (stages one after another)", log_y=True)
        plots.append(("training objective per stage", LOSS_CURVES))
    if rows:
        _bar_chart({row["stage"]: row["params"] for row in rows}, out / PARAMETERS)
        plots.append(("parameters per stage", PARAMETERS))
    return plots


def _bar_chart(values: dict[str, int], out_png: Path) -> None:
    from matplotlib.figure import Figure

    from megatron_hybrid.engine.metrics import DPI, FIGSIZE, format_si

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(list(values), list(values.values()))
    ax.bar_label(bars, labels=[format_si(value) for value in values.values()])
    ax.set_ylabel("parameters")
    ax.set_title("Parameters per stage")
    fig.savefig(out_png, dpi=DPI)


def _first_given(*values):
    return next((value for value in values if value is not None), None)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
