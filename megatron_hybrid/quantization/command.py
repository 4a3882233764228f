"""The ``quantize`` command's logic: PTQ of a checkpoint in one or more formats, each measured
against the unquantized model, the last one saved and exported.

For ``bf16`` (the checkpoint as it is; its own precision, fp32 on the cpu backend) and each
format the checkpoint is loaded anew, quantized (calibrated on ``calibration_samples`` of the
calibration data) and measured: held-out loss on ``heldout_samples`` and, given, the task
metric. Runs in this process alone (TP = PP = CP = 1); checkpoints of any layout load.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.quantization import export, formats, ptq

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REFERENCE = "bf16"
"""The unquantized row of the comparison."""
REPORT = "quantize_report"
SERVING_CONTEXT = 131072
"""The context of the planner's serving memory per format (128k)."""
STAGE_EXPORT = "hf"
"""Where a quantize stage (a pipeline's) writes its HF export, in its output folder."""
EXPORTABLE = ("fp8", "nvfp4")
"""Formats ModelOpt's Megatron export writes (it refuses SmoothQuant and AWQ scales)."""


@dataclass(kw_only=True)
class Request:
    checkpoint: str
    """The unquantized checkpoint (a step_* folder)."""
    formats: list[str]
    """Formats measured, in order; the last is saved and exported."""
    calibration_samples: int = 32
    """Samples of the calibration data the quantizers' ranges are set on."""
    heldout_samples: int = 32
    """Held-out samples of the loss."""
    save: str | None = None
    """Write the last format's quantized checkpoint (and the report) here."""
    export_hf: str | None = None
    """Write the last format's quantized HF checkpoint here."""
    hf_target: str = "vllm"
    """vllm (ModelOpt's unified format) or transformers (FP8 only)."""

    def validate(self) -> None:
        if not self.formats:
            raise ConfigError("--format: give one or more of " + ", ".join(formats.FORMATS))
        for name in self.formats:
            formats.get_format(name)
        for name in ("calibration_samples", "heldout_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be "
                                  f">= 1")
        if self.export_hf:
            export.check_target(self.hf_target, self.formats[-1])
            if self.formats[-1] not in EXPORTABLE:
                raise ConfigError(
                    f"--export-hf: ModelOpt's Megatron export writes {' and '.join(EXPORTABLE)}, "
                    f"not {self.formats[-1]} (it refuses SmoothQuant and AWQ scales): end "
                    f"--format with fp8 or nvfp4, or drop --export-hf")
        for path in (self.save, self.export_hf):
            if path and Path(path).exists():
                raise ConfigError(f"{path} already exists: remove it or choose another path")

    def check_batches(self, micro_batch_size: int) -> None:
        """Refuse sample counts that are not whole micro-batches (as prune does)."""
        for name in ("calibration_samples", "heldout_samples"):
            if getattr(self, name) % micro_batch_size:
                raise ConfigError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be "
                                  f"a multiple of train.micro_batch_size ({micro_batch_size})")


def check_stage(cfg: RunConfig, world_size: int = 1) -> None:
    """Refuse, in one line, a quantize stage (a pipeline's) that lacks its model or format, or
    that would run in several processes."""
    if world_size != 1:
        raise ConfigError(f"a quantize stage runs in one process (checkpoints of any layout "
                          f"load), not {world_size}: give it parallel.tp=1, parallel.pp=1, "
                          f"parallel.cp=1 and no nproc")
    if not cfg.checkpoint.load:
        raise ConfigError("a quantize stage quantizes checkpoint.load: give it, e.g. "
                          "inputs: {checkpoint.load: distill}")
    if cfg.quant.format not in EXPORTABLE:
        raise ConfigError(f"a quantize stage saves and exports quant.format: set it to "
                          f"{' or '.join(EXPORTABLE)} (ModelOpt's Megatron export writes "
                          f"those), got {cfg.quant.format!r}; measure others in quant.compare")


def checkpoint_run(cfg: RunConfig, checkpoint: str) -> RunConfig:
    """``cfg`` for quantizing ``checkpoint``: its saved model (local spec: ModelOpt's), in
    this process alone; a quantized checkpoint is refused."""
    from megatron_hybrid.checkpoint.dist_checkpoint import read_meta
    from megatron_hybrid.model.config import ModelConfig

    meta = read_meta(checkpoint)
    if ptq.QUANTIZATION_META in meta:
        raise ConfigError(f"{checkpoint} is already quantized "
                          f"({meta[ptq.QUANTIZATION_META]['format']}): give the checkpoint it "
                          f"was quantized from")
    model = ModelConfig(**{**meta["model"], "transformer_impl": "local"})
    parallel = dataclasses.replace(cfg.parallel, tp=1, pp=1, cp=1, ep=1, etp=None,
                                   sequence_parallel=False)
    return dataclasses.replace(cfg, model=model, parallel=parallel)


def run(cfg: RunConfig, request: Request, *, describe: Callable,
        datasets: Callable | None = None, task_metric: Callable | None = None) -> dict:
    """The comparison (``{"rows": [...], ...}``) of ``request`` in a session of ``cfg``:
    ``datasets(cfg, request)`` gives (calibration, held-out) data (None: ``cfg.data``'s train
    and validation splits); ``task_metric(model, tokenizer)`` the right answers and the
    problems asked per task metric (``{name: [correct, asked]}``); ``describe(held-out,
    samples)`` names the held-out data for the report."""
    from megatron_hybrid.data.tokenizer import load_tokenizer
    from megatron_hybrid.engine import training_loop

    request.validate()
    request.check_batches(cfg.train.micro_batch_size)
    with training_loop.session(cfg) as (backend, _):
        calibration, heldout = (datasets or _corpus)(cfg, request)
        tokenizer = load_tokenizer(cfg.tokenizer)
        rows = []
        for name in [REFERENCE, *request.formats]:
            model = _loaded(cfg, request.checkpoint, backend)
            if name != REFERENCE:
                ptq.quantize(model, name, cfg.model.layer_pattern.layers, backend=backend,
                             forward_loop=_loss_on(cfg, calibration,
                                                   request.calibration_samples))
            rows.append({"format": name,
                         "heldout_loss": _loss_on(cfg, heldout, request.heldout_samples)(model),
                         "task": task_metric(model, tokenizer) if task_metric else None})
        _write(cfg, request, model, tokenizer)
    return {"checkpoint": request.checkpoint, "calibration_samples": request.calibration_samples,
            "heldout_samples": request.heldout_samples,
            "heldout_data": describe(heldout, request.heldout_samples),
            "rows": rows, "saved": request.save, "exported": request.export_hf}


def _corpus(cfg: RunConfig, request: Request) -> tuple:
    from megatron_hybrid.data.datasets import build_datasets
    from megatron_hybrid.data.tokenizer import load_tokenizer

    calibration, heldout = build_datasets(
        cfg.data, load_tokenizer(cfg.tokenizer), seq_length=cfg.seq_length,
        train_samples=request.calibration_samples, valid_samples=request.heldout_samples)
    if heldout is None:
        raise ConfigError(f"the held-out loss needs a validation share: give data.split one "
                          f"(e.g. data.split='98,2,0'), got {cfg.data.split!r}, or use "
                          f"--task-data")
    return calibration, heldout


def _loss_on(cfg: RunConfig, dataset, samples: int) -> Callable:
    def loss(model) -> float:
        return ptq.mean_loss(model, dataset, samples=samples,
                             micro_batch_size=cfg.train.micro_batch_size,
                             seq_length=cfg.seq_length)
    return loss


def _loaded(cfg: RunConfig, checkpoint: str, backend: str):
    from megatron_hybrid.checkpoint.dist_checkpoint import load_weights
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups

    process_groups.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, ModelLayout(precision=cfg.train.precision), backend=backend,
                        perform_initialization=False)
    load_weights([model], checkpoint)
    return model


def _write(cfg: RunConfig, request: Request, model, tokenizer) -> None:
    name = request.formats[-1]
    if request.save:
        ptq.save_quantized(model, request.save, name=name, source=request.checkpoint)
    if request.export_hf:
        export.export_hf(model, cfg.model, request.export_hf, tokenizer_json=tokenizer.json_path,
                         name=name, target=request.hf_target)


def write_report(report: dict, directory: str | Path) -> None:
    """``quantize_report.{json,md}`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{REPORT}.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / f"{REPORT}.md").write_text(format_markdown(report))


def format_markdown(report: dict) -> str:
    """The report: where it was calibrated and measured, and :func:`table`."""
    return "\n".join([f"# Quantization of `{report['checkpoint']}`", "",
                      f"Calibrated on {report['calibration_samples']} samples; held-out loss "
                      f"on {report['heldout_samples']} samples ({report['heldout_data']}).",
                      "", *table(report), ""])


def table(report: dict) -> list[str]:
    """The rows side by side: held-out loss, task accuracies (right answers of those asked),
    weights and serving memory."""
    accuracy_names = sorted({name for row in report["rows"] for name in (row["task"] or {})})
    memory = report.get("memory") or {}
    header = ["format", "held-out loss", *accuracy_names,
              *(["weights (MiB)", f"serving {memory.get('context', 0) // 1024}k (MiB)"]
                if memory else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        tally = row["task"] or {}
        cells = [row["format"], f"{row['heldout_loss']:.4f}",
                 *(_accuracy(*tally[name]) if name in tally else "n/a"
                   for name in accuracy_names)]
        if memory:
            figure = memory["formats"][row["format"]]
            cells += [f"{figure['weights'] / 2**20:,.1f}", f"{figure['total'] / 2**20:,.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _accuracy(correct: int, asked: int) -> str:
    return f"{correct / asked:.1%} ({correct}/{asked})"
