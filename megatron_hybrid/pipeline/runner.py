"""The pipeline runner: the stages of a pipeline file run in order, each in its own process.

A pipeline file chains run recipes; a stage reads earlier stages' outputs by their names::

    pipeline: tiny-nano-v2           # the pipeline's name; this key marks a pipeline file
    output_dir: runs/{pipeline}      # optional (the default); --output replaces it
    task_samples: 256                # optional: task accuracy of every stage's model (0: off)
    stages:
      - name: pretrain
        kind: train                  # one of STAGE_KINDS
        recipe: pretrain.yaml        # a run recipe, relative to this file
        overrides: [train.max_steps=100]
        task_samples: 0              # optional: this stage's own count (0: not measured)
      - name: long_context
        kind: train
        recipe: long_context.yaml
        inputs: {checkpoint.load: pretrain}   # the key gets pretrain's final checkpoint
        nproc: 2                     # optional: ranks on this machine (default tp * pp * cp)
      - name: prune
        kind: prune
        recipe: prune.yaml
        inputs: {checkpoint.load: long_context}
      - name: distill
        kind: distill
        recipe: distill.yaml
        inputs: {checkpoint.load: prune, model: prune, distill.teacher: long_context}
                                     # model: the shape and pattern saved in prune's checkpoint
      - name: quantize
        kind: quantize               # PTQ in the formats of the recipe's quant section
        recipe: distill.yaml
        overrides: [quant.format=nvfp4, "quant.compare=[fp8]"]
        inputs: {checkpoint.load: distill}

Stage NAME writes to OUTPUT/NAME (its recipe's output_dir is replaced) and logs to
``stage.log`` there. It runs as ``python -m megatron_hybrid.cli.pipeline KIND RECIPE key=value...``
(under torchrun when it has several ranks), so a failure stays in its process and is reported
in one line with the log's path. With ``task_samples``, the stage's final checkpoint then
answers that many held-out task problems (``stages/task.py``; ``python -m megatron_hybrid.cli.pipeline
evaluate CHECKPOINT N OUT.json``, one process); the right answers per mode and the seconds it
took go to ``task_metrics.json``. A ``quantize`` stage answers them itself, with each format's
model (``TASK_SAMPLES_KEY``: the runner passes the count as ``quant.task_samples``).
When a stage exits well the runner writes ``DONE`` (JSON: the
final checkpoint, the seconds of the finishing attempt, the command): a finished stage is
skipped on the next run. An unfinished stage starts again and its run resumes from its own
``checkpoints/latest``. Every run ends by writing OUTPUT/report.md (``pipeline/report.py``).

One module because reading a pipeline file, planning its stages and running them share
the ``Stage`` / ``StagePlan`` records and the checks that name keys in the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from megatron_hybrid.pipeline import report

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig


STAGE_KINDS = ("train", "sft", "dpo", "grpo", "reward-model", "prune", "distill", "quantize")
"""What a stage's ``kind`` may be; ``megatron-hybrid KIND`` runs it (``cli.pipeline``)."""
PIPELINE_KEY = "pipeline"
TOP_KEYS = (PIPELINE_KEY, "output_dir", "task_samples", "stages")
STAGE_KEYS = ("name", "kind", "recipe", "overrides", "inputs", "nproc", "task_samples")
DONE = "DONE"
LOG = "stage.log"
EVALUATE = "evaluate"
"""The stage process's command that scores a checkpoint on the task (``stages/task.py``)."""
TASK_SAMPLES_KEY = {"quantize": "quant.task_samples"}
"""Stage kinds that answer the task problems themselves (each format, in a quantize stage),
and the recipe key their count goes to; the runner scores the others' final checkpoints."""

LATEST = Path("checkpoints") / "latest"
"""Where a run's Checkpointer names its newest complete checkpoint (relative to the run)."""
MODEL_INPUT = "model"
"""The input key that takes a stage's saved model rather than its checkpoint's path."""
NOT_YET = "<final>"
"""Stands for the step folder of a checkpoint that does not exist yet (in the plan)."""
PLAN_GPU = "h100"
"""The GPU the planner's estimates are for: the one the published layouts are sized for."""


class PipelineError(ValueError):
    """A pipeline file or a selection is wrong; the message names the stage and the fix."""


class StageFailed(RuntimeError):
    """A stage's process failed; the message names the stage, the error and the log."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    """Names the stage's output folder and what later stages' inputs refer to."""
    kind: str
    """What runs the recipe: a key of STAGE_KINDS."""
    recipe: Path
    """The run recipe (resolved against the pipeline file's folder)."""
    overrides: tuple[str, ...] = ()
    """``key=value`` overrides of the recipe."""
    inputs: dict = dataclasses.field(default_factory=dict)
    """Recipe key -> the earlier stage whose final checkpoint it gets; the key ``model`` gets
    the model saved in that checkpoint (e.g. the shape and pattern a prune chose)."""
    nproc: int | None = None
    """Ranks on this machine; None: the recipe's tp * pp * cp."""
    task_samples: int | None = None
    """Held-out task problems its model answers; None: the pipeline's ``task_samples``."""


@dataclasses.dataclass(frozen=True)
class Pipeline:
    name: str
    path: Path
    output_dir: Path
    stages: list[Stage]
    task_samples: int = 0
    """Held-out task problems each finished stage's model answers (0: no task metric)."""

    def task_samples_of(self, stage: Stage) -> int:
        """The held-out task problems ``stage``'s final model answers (0: none)."""
        return self.task_samples if stage.task_samples is None else stage.task_samples

    def run_dir(self, name: str) -> Path:
        return self.output_dir / name

    def is_finished(self, name: str) -> bool:
        return (self.run_dir(name) / DONE).is_file()

    def done(self, name: str) -> dict:
        """The DONE record of a finished stage (its checkpoint, seconds, command)."""
        return json.loads((self.run_dir(name) / DONE).read_text())

    def final_checkpoint(self, name: str) -> Path:
        """The checkpoint a finished stage left (``NOT_YET`` stands in before it finished)."""
        if not self.is_finished(name):
            return self.run_dir(name) / "checkpoints" / NOT_YET
        return self.run_dir(name) / self.done(name)["checkpoint"]


# -- command line -----------------------------------------------------------------------------


# -- reading a pipeline file ------------------------------------------------------------------

def load_pipeline(path: str | os.PathLike, output_dir: str | None = None) -> Pipeline:
    """The pipeline of ``path``, its structure checked (keys, kinds, names, inputs)."""
    path = Path(path)
    raw = _read(path)
    name = raw[PIPELINE_KEY]
    if not (isinstance(name, str) and name):
        raise PipelineError(f"{path}: {PIPELINE_KEY}: give the pipeline a name (text)")
    entries = raw.get("stages")
    if not (isinstance(entries, list) and entries):
        raise PipelineError(f"{path}: stages: give a list of stages ({{name: ..., kind: ..., "
                            f"recipe: ...}} each)")
    stages = [_parse_stage(path, index, entry) for index, entry in enumerate(entries)]
    _check_names(path, stages)
    _check_order(path, stages)
    output = output_dir or str(raw.get("output_dir", "runs/{pipeline}")).format(pipeline=name)
    task_samples = _task_samples(raw.get("task_samples", 0), f"{path}: task_samples")
    return Pipeline(name=name, path=path, output_dir=Path(output), stages=stages,
                    task_samples=task_samples)


def _task_samples(value, where: str) -> int:
    from megatron_hybrid.stages.task import HELDOUT

    if not (type(value) is int and 0 <= value <= HELDOUT):
        raise PipelineError(f"{where}: give a whole number from 0 (no task metric) to "
                            f"{HELDOUT}, got {value!r}")
    return value


def _read(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if not (isinstance(raw, dict) and PIPELINE_KEY in raw):
        raise PipelineError(f"{path}: not a pipeline file: it needs a top-level "
                            f"'{PIPELINE_KEY}: NAME' and 'stages:' (a run recipe goes to "
                            f"megatron-hybrid train)")
    _check_keys(raw, TOP_KEYS, f"{path}: top level")
    return raw


def _parse_stage(path: Path, index: int, entry) -> Stage:
    where = f"{path}: stages[{index}]"
    if not isinstance(entry, dict):
        raise PipelineError(f"{where}: expected a mapping {{name: ..., kind: ..., recipe: ...}}")
    where = f"{path}: stage {entry.get('name', index)!r}"
    _check_keys(entry, STAGE_KEYS, where)
    for key in ("name", "kind", "recipe"):
        if not (isinstance(entry.get(key), str) and entry[key]):
            raise PipelineError(f"{where}: {key}: required, as text")
    if entry["kind"] not in STAGE_KINDS:
        raise PipelineError(f"{where}: kind {entry['kind']!r} is unknown: "
                            f"{_did_you_mean(entry['kind'], STAGE_KINDS)}choose one of "
                            f"{', '.join(STAGE_KINDS)}")
    recipe = path.parent / entry["recipe"]
    if not recipe.is_file():
        raise PipelineError(f"{where}: recipe {recipe} not found (recipe paths are relative to "
                            f"the pipeline file)")
    overrides = entry.get("overrides") or []
    if not (isinstance(overrides, list) and all(isinstance(o, str) and "=" in o
                                                for o in overrides)):
        raise PipelineError(f"{where}: overrides: give a list of key=value texts, e.g. "
                            f"[train.max_steps=100]")
    inputs = entry.get("inputs") or {}
    if not (isinstance(inputs, dict) and all(isinstance(v, str) for v in inputs.values())):
        raise PipelineError(f"{where}: inputs: give a mapping of recipe key -> stage name, "
                            f"e.g. {{checkpoint.load: pretrain}}")
    overridden = [key for key in inputs if any(o.split("=")[0] == key for o in overrides)]
    if overridden:
        raise PipelineError(f"{where}: {overridden[0]} is both an input and an override: "
                            f"drop one of them")
    nproc = entry.get("nproc")
    if nproc is not None and not (type(nproc) is int and nproc > 0):
        raise PipelineError(f"{where}: nproc={nproc!r} must be a positive integer")
    task_samples = entry.get("task_samples")
    if task_samples is not None:
        _task_samples(task_samples, f"{where}: task_samples")
    return Stage(name=entry["name"], kind=entry["kind"], recipe=recipe,
                 overrides=tuple(overrides), inputs=dict(inputs), nproc=nproc,
                 task_samples=task_samples)


def _check_keys(raw: dict, valid: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in valid:
            raise PipelineError(f"{where}: unknown key {key!r}: "
                                f"{_did_you_mean(str(key), valid)}valid keys: {', '.join(valid)}")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _check_names(path: Path, stages: list[Stage]) -> None:
    seen = set()
    for stage in stages:
        if stage.name in seen:
            raise PipelineError(f"{path}: two stages are named {stage.name!r}: stage names "
                                f"name output folders and inputs, so give each its own")
        if "/" in stage.name or stage.name.startswith("."):
            raise PipelineError(f"{path}: stage name {stage.name!r} must be a plain folder "
                                f"name (no '/', no leading '.')")
        seen.add(stage.name)


def _check_order(path: Path, stages: list[Stage]) -> None:
    """Every input names an earlier stage (stages run in file order)."""
    position = {stage.name: index for index, stage in enumerate(stages)}
    for index, stage in enumerate(stages):
        for key, source in stage.inputs.items():
            where = f"{path}: stage {stage.name!r}: inputs.{key}"
            if source not in position:
                raise PipelineError(f"{where}: no stage is named {source!r}: "
                                    f"{_did_you_mean(source, position)}stages are "
                                    f"{', '.join(position)}")
            if position[source] < index:
                continue
            cycle = _cycle(stages, stage.name, source)
            if cycle:
                raise PipelineError(f"{where}: the inputs form a cycle {' -> '.join(cycle)} "
                                    f"(each reads the next): a stage can only read the output "
                                    f"of a stage before it; remove one of these inputs")
            raise PipelineError(f"{where}: stage {source!r} comes later: stages run in file "
                                f"order, so move {source!r} before {stage.name!r}")


def _cycle(stages: list[Stage], start: str, source: str) -> list[str] | None:
    """``[start, source, ..., start]`` when ``source`` reads (through inputs) ``start``."""
    inputs = {stage.name: list(stage.inputs.values()) for stage in stages}
    paths = [[start, source]]
    while paths:
        path = paths.pop()
        if path[-1] == start:
            return path
        paths += [[*path, name] for name in inputs.get(path[-1], []) if name not in path[1:]]
    return None


# -- planning ---------------------------------------------------------------------------------

@dataclasses.dataclass
class StagePlan:
    stage: Stage
    run_dir: Path
    overrides: list[str]
    """The stage's overrides, then its inputs, its output folder and (a kind that answers the
    task problems itself) their count."""
    cfg: RunConfig
    """The stage's resolved RunConfig (inputs not yet written stand in as NOT_YET paths)."""
    nproc: int
    status: str
    """``finished``, ``run``, ``resume`` or ``not selected``."""

    @property
    def command(self) -> list[str]:
        entry = ["-m", "megatron_hybrid.cli.pipeline", self.stage.kind, str(self.stage.recipe),
                 *self.overrides]
        if self.nproc == 1:
            return [sys.executable, *entry]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(self.nproc), *entry]


def select(pipeline: Pipeline, *, only: str | None, start: str | None) -> set[str]:
    """Names of the stages this invocation may run."""
    names = [stage.name for stage in pipeline.stages]
    chosen = only or start
    if chosen is None:
        return set(names)
    if chosen not in names:
        flag = "--only" if only else "--from"
        raise PipelineError(f"{flag} {chosen}: no such stage: {_did_you_mean(chosen, names)}"
                            f"stages are {', '.join(names)}")
    return {chosen} if only else set(names[names.index(chosen):])


def plan_stage(pipeline: Pipeline, stage: Stage, selected: bool) -> StagePlan:
    """The stage's command and resolved config, refused in one line if its recipe is wrong."""
    from megatron_hybrid import recipe

    run_dir = pipeline.run_dir(stage.name)
    inputs = [_input_override(pipeline, key, source) for key, source in stage.inputs.items()]
    overrides = [*stage.overrides, *filter(None, inputs), f"output_dir={run_dir}"]
    if stage.kind in TASK_SAMPLES_KEY:
        overrides.append(f"{TASK_SAMPLES_KEY[stage.kind]}={pipeline.task_samples_of(stage)}")
    try:
        cfg = recipe.load_recipe(stage.recipe, overrides)
        nproc = stage.nproc or cfg.parallel.model_parallel_size
        cfg.validate(world_size=nproc)
        if stage.kind == "quantize":
            from megatron_hybrid.quantization.command import check_stage

            check_stage(cfg, nproc)
    except (ValueError, FileNotFoundError) as err:
        raise PipelineError(f"stage {stage.name!r} ({stage.recipe}): {err}") from None
    if pipeline.is_finished(stage.name):
        status = "finished"
    elif not selected:
        status = "not selected"
    else:
        status = "resume" if (run_dir / LATEST).is_file() else "run"
    return StagePlan(stage, run_dir, overrides, cfg, nproc, status)


def _input_override(pipeline: Pipeline, key: str, source: str) -> str | None:
    """``key=value`` for one input; None for a model not saved yet (the recipe's stands in)."""
    checkpoint = pipeline.final_checkpoint(source)
    if key != MODEL_INPUT:
        return f"{key}={checkpoint}"
    if not pipeline.is_finished(source):
        return None
    model = json.loads((checkpoint / "meta.json").read_text())["model"]
    model.pop("seq_length")  # the recipe's stays: a stage may train on longer sequences
    return f"{MODEL_INPUT}={json.dumps(model)}"


def check_inputs_ready(pipeline: Pipeline, selected: set[str]) -> None:
    """Refuse a selection whose stages read a stage that is neither finished nor run first."""
    for stage in pipeline.stages:
        if stage.name not in selected or pipeline.is_finished(stage.name):
            continue
        for source in stage.inputs.values():
            if source not in selected and not pipeline.is_finished(source):
                raise PipelineError(
                    f"stage {stage.name!r} reads stage {source!r}, which has not finished and "
                    f"is not selected: run --from {source}, or the whole pipeline")


def describe_plan(pipeline: Pipeline, plans: list[StagePlan]) -> str:
    lines = [f"pipeline {pipeline.name} ({pipeline.path}) -> {pipeline.output_dir}"]
    for number, plan in enumerate(plans, 1):
        lines += [f"{number}. {plan.stage.name} [{plan.stage.kind}]: {_status_text(plan)}",
                  *(f"     {label:<8} {text}" for label, text in _plan_rows(pipeline, plan))]
    return "\n".join(lines)


def _status_text(plan: StagePlan) -> str:
    if plan.status == "resume":
        return f"will resume from {(plan.run_dir / LATEST).read_text().strip()}"
    return {"finished": "finished, skipped", "run": "will run",
            "not selected": "not selected"}[plan.status]


def _plan_rows(pipeline: Pipeline, plan: StagePlan) -> list[tuple[str, str]]:
    cfg, stage = plan.cfg, plan.stage
    model, layout = cfg.model, cfg.parallel
    counts = model.layer_pattern.counts
    inputs = ", ".join(f"{key} <- {source} ({_input_text(pipeline, key, source)})"
                       for key, source in stage.inputs.items())
    dp = plan.nproc // layout.model_parallel_size
    samples = pipeline.task_samples_of(stage)
    return [
        ("recipe", " ".join([str(stage.recipe), *stage.overrides])),
        ("inputs", inputs or "none"),
        ("output", str(plan.run_dir)),
        ("model", f"{model.num_layers} layers ({counts['M']} Mamba, {counts['*']} attention, "
                  f"{counts['-']} MLP), hidden {model.hidden_size}, FFN "
                  f"{model.ffn_hidden_size}, vocab {model.vocab_size}"),
        ("layout", f"tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {dp} = world size "
                   f"{plan.nproc}, sequence parallel {'on' if layout.sequence_parallel else 'off'}"
                   f", backend {layout.backend}"),
        ("work", _work_text(cfg, stage.kind, plan.run_dir)),
        ("estimate", _estimate_text(cfg, stage.kind, plan.nproc)),
        ("command", shlex.join(plan.command)),
        *([("evaluate", f"{samples} held-out task problems, /think and /no_think, "
                        f"{_evaluated_by(stage.kind)}")] if samples else []),
    ]


def _evaluated_by(kind: str) -> str:
    """Which model answers the stage's task problems, and where the answers go."""
    from megatron_hybrid.quantization import command

    if kind == "quantize":
        return f"by each format's model, in the stage -> {command.REPORT}.json"
    return f"by the final checkpoint -> {report.TASK_METRICS}"


def _work_text(cfg: RunConfig, kind: str, run_dir: Path) -> str:
    """What the stage computes: pruning targets, the formats it quantizes in, the rollouts it
    samples, or the tokens it trains on."""
    if kind == "quantize":
        from megatron_hybrid.quantization.command import STAGE_EXPORT

        quant = cfg.quant
        data = "task conversations" if quant.task_data else "samples of data"
        return (f"PTQ in {', '.join(quant.formats)} against bf16: calibration on "
                f"{quant.calibration_samples} {data}, held-out loss on "
                f"{quant.heldout_samples} held-out ones; {quant.format} saved and exported to "
                f"{run_dir / STAGE_EXPORT}")
    if kind == "grpo":
        grpo = cfg.grpo
        pool = (f"{grpo.train_problems} training problems" if grpo.train_problems
                else "every training problem")
        return (f"{cfg.total_steps:,} steps x {grpo.rollout_batch} prompts x "
                f"{grpo.group_size} sampled completions (up to {grpo.max_new_tokens} tokens) "
                f"from {pool}, /think and /no_think")
    if kind == "prune":
        target = cfg.prune.export_config or {"max_params": cfg.prune.max_params}
        return (f"prune to {json.dumps(target)} after {cfg.prune.calibration_samples} "
                f"calibration samples of {cfg.seq_length} tokens")
    tokens = cfg.total_steps * cfg.train.tokens_per_step(cfg.model)
    return (f"{cfg.total_steps:,} steps x {cfg.train.global_batch_size} sequences x "
            f"{cfg.seq_length} tokens = {_si(tokens)} tokens, {cfg.train.precision}")


def _estimate_text(cfg: RunConfig, kind: str, nproc: int) -> str:
    """The planner's memory per device and, for GPU stages, time of the stage's work."""
    from megatron_hybrid.planning import planner

    gpu = planner.GPUS[PLAN_GPU]
    if kind == "quantize":
        return _serving_text(cfg)
    if kind == "prune":  # a forward pass of the whole model in bf16 on one device
        memory = planner.inference_memory(cfg.model, context=cfg.seq_length,
                                       batch=cfg.train.micro_batch_size)
        return f"{_gib(memory.total)} per device (bf16 weights, calibration forward)"
    layout = planner.TrainingLayout.from_run(cfg, nproc)
    on_gpu = cfg.parallel.backend == "cuda"
    memory = planner.training_memory(cfg.model, layout, kernels="cuda" if on_gpu else "cpu")
    student = " (the student; the teacher adds its weights)" if kind == "distill" else ""
    if not on_gpu:
        return f"{_gib(memory.total)} per rank{student}; the planner times GPU runs only"
    peak = gpu.peak_flops(layout.precision)
    verdict = "fits" if memory.total <= gpu.usable_bytes else "does NOT fit"
    text = (f"{_gib(memory.total)} per GPU{student}, {verdict} an {gpu.device_name} "
            f"({_gib(gpu.usable_bytes)} usable)")
    if peak is None:
        return text
    step = planner.step_estimate(cfg.model, layout, peak)
    return (f"{text}; step ~{step.seconds:.3g} s at MFU ~{step.mfu:.0%}, "
            f"{cfg.total_steps:,} steps ~{_duration(step.seconds * cfg.total_steps)} on "
            f"{nproc} GPUs")


def _serving_text(cfg: RunConfig) -> str:
    """The planner's serving memory of the recipe's model in bf16 and each format, at 128k."""
    from megatron_hybrid.planning import planner
    from megatron_hybrid.quantization.command import REFERENCE, SERVING_CONTEXT

    totals = {name: planner.quantized_inference_memory(cfg.model, name,
                                                       context=SERVING_CONTEXT).total
              for name in [REFERENCE, *cfg.quant.formats]}
    figures = ", ".join(f"{name} {_gib(total)}" for name, total in totals.items())
    return f"serving one {SERVING_CONTEXT // 1024}k sequence: {figures} (the recipe's model)"


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _duration(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= scale or unit == "s":
            value = seconds / scale
            return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def _input_text(pipeline: Pipeline, key: str, source: str) -> str:
    checkpoint = pipeline.final_checkpoint(source)
    return f"the model saved in {checkpoint}" if key == MODEL_INPUT else str(checkpoint)


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


# -- running ----------------------------------------------------------------------------------

def run_planned(pipeline: Pipeline, plan: StagePlan) -> None:
    """Run one planned stage in its own process (or say why it does not run)."""
    name = plan.stage.name
    if plan.status == "finished":
        print(f"{name}: finished ({plan.run_dir / DONE}), skipped; delete {plan.run_dir} to run "
              f"it again", flush=True)
        return
    if plan.status == "not selected":
        print(f"{name}: not selected", flush=True)
        return
    plan = plan_stage(pipeline, plan.stage, selected=True)  # its inputs have finished by now
    print(f"{name}: {_status_text(plan)} -> {plan.run_dir} (log: {plan.run_dir / LOG})",
          flush=True)
    started = time.monotonic()
    _launch(plan, plan.command)
    samples = pipeline.task_samples_of(plan.stage)
    if samples and plan.stage.kind not in TASK_SAMPLES_KEY:
        _launch(plan, [sys.executable, "-m", "megatron_hybrid.cli.pipeline", EVALUATE,
                       str(plan.run_dir / _final_checkpoint(plan)), str(samples),
                       str(plan.run_dir / report.TASK_METRICS)])
    seconds = time.monotonic() - started
    _mark_done(plan, seconds)
    print(f"{name}: done in {seconds:.0f} s", flush=True)


def _launch(plan: StagePlan, command: list[str]) -> None:
    """Run a command of the stage, its output going to the log and, indented, to stdout."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = plan.run_dir / LOG
    last = "no output"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach the log as they are printed
    # The ranks share the pipeline's threads (OMP_NUM_THREADS where set, else the cores):
    # each would otherwise take them all (torchrun sets 1 only where nothing is set).
    budget = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env["OMP_NUM_THREADS"] = str(max(1, budget // plan.nproc))
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # a kill loses no line
        log.write(f"$ {shlex.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            log.write(line)
            print(f"  {line}", end="", flush=True)
            last = line.strip() or last
        code = process.wait()
    if code:
        raise StageFailed(f"stage {plan.stage.name!r} failed (exit code {code}): {last} -- "
                          f"log: {log_path}; fix it and run the pipeline again (finished stages "
                          f"are skipped, this one resumes)")


def _final_checkpoint(plan: StagePlan) -> Path:
    """The checkpoint a stage's run ended with (relative to its run directory)."""
    pointer = plan.run_dir / LATEST
    if not pointer.is_file():
        raise StageFailed(f"stage {plan.stage.name!r} exited well but left no checkpoint "
                          f"({pointer}): check its log {plan.run_dir / LOG}")
    return LATEST.parent / pointer.read_text().strip()


def _mark_done(plan: StagePlan, seconds: float) -> None:
    done = {"stage": plan.stage.name, "kind": plan.stage.kind,
            "checkpoint": str(_final_checkpoint(plan)),
            "seconds": round(seconds, 1), "command": plan.command}
    partial = plan.run_dir / f"{DONE}.partial"
    partial.write_text(json.dumps(done, indent=2) + "\n")
    os.replace(partial, plan.run_dir / DONE)  # a DONE is whole or absent

