"""The distill stage: knowledge distillation of a (pruned) student from a frozen teacher.

``megatron-hybrid distill RECIPE [key=value ...]`` starts the student from
``checkpoint.load`` (e.g. the prune stage's checkpoint) and the teacher from
``distill.teacher``, on the same parallel layout, and trains the student through the loop,
checkpoints and metrics of pretraining (``engine/training_loop.py``). The loss is ModelOpt's
(``modelopt.torch.distill`` and its Megatron plugin): logits KL at a temperature (optionally
over the teacher's top-k), plus optional cosine losses between chosen layers' hidden states,
plus optionally the student's own next-token loss. Checkpoints hold the student only, so the
result loads as a plain model; a stopped run resumes like any training run.

The run directory also gets ``distill_report.{md,json}``: held-out loss of student and
teacher and the held-out KL at the start and end of the run, the data they were measured on,
and the fraction of the student-teacher gap closed (n/a below ``MIN_GAP``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from functools import partial
from pathlib import Path
from types import MethodType
from typing import TYPE_CHECKING

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.stages.common import describe_heldout, task_dataset
from megatron_hybrid.stages.config import DistillConfig

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REPORT = "distill_report"
LOGITS_LOSS = "Logits"
"""ModelOpt names each loss by its class: the logits KL's name contains this."""
MIN_GAP = 0.01
"""Nats of held-out loss between pruned student and teacher below which the fraction of the
gap closed is reported as n/a: there it is mostly noise (a 0.0095-nat gap read as 79% closed
on one machine and 135% on another)."""


# -- checks before anything is loaded ---------------------------------------------------------

def check_request(cfg: RunConfig) -> tuple[RunConfig, ModelConfig]:
    """(``cfg`` with the student's saved model, the teacher's model) after refusing, in one
    line each, a missing teacher or student, and a teacher that cannot share the student's
    layout (TP, PP, CP, sequence length, vocabulary)."""
    from megatron_hybrid.stages.common import (
        checkpoint_model,
        require_heldout_data,
        saved_model,
        with_modelopt_spec,
    )

    cfg = with_modelopt_spec(cfg, "distill")  # first: what the stage builds is validated
    cfg.validate()
    if not cfg.distill.task_data:
        require_heldout_data(cfg, "distillation")
    if cfg.quant.enabled and not cfg.distill.task_data:
        raise ConfigError("quant (QAD) calibrates the student on the task's training "
                          "conversations: set distill.task_data=true, or unset quant.format")
    if not cfg.distill.teacher:
        raise ConfigError("set distill.teacher to the teacher's checkpoint (a checkpoints/step_* "
                          "folder)")
    if cfg.parallel.pp != 1:
        raise ConfigError("distillation runs at parallel.pp=1 for now (the engine does not "
                          "yet pass ModelOpt's teacher+student tensor shapes to the pipeline "
                          "schedule): set parallel.pp=1")
    student = checkpoint_model(cfg, role="student (e.g. the prune stage's checkpoint)")
    teacher = saved_model(cfg.distill.teacher, cfg.model.transformer_impl)
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"teacher vocabulary ({teacher.vocab_size}) differs from the "
                          f"student's ({student.vocab_size}): distill between models that "
                          f"share a tokenizer")
    try:
        dataclasses.replace(cfg, model=teacher).validate()
    except ConfigError as err:
        raise ConfigError(f"the teacher ({cfg.distill.teacher}) cannot run on this layout: "
                          f"{err}") from None
    cfg.distill.check_against(student, teacher)
    return dataclasses.replace(cfg, model=student), teacher


# -- distillation -----------------------------------------------------------------------------

def distill(cfg: RunConfig, teacher_cfg: ModelConfig, backend: str, dims) -> dict:
    """Train the student of ``cfg`` against its teacher; return (and write) the report."""
    from megatron_hybrid.checkpoint.dist_checkpoint import load_weights
    from megatron_hybrid.engine import training_loop
    from megatron_hybrid.model.build import build_model
    from megatron_hybrid.parallel import process_groups
    from megatron_hybrid.quantization import ptq

    process_groups.seed_everything(cfg.train.seed)
    teacher = build_model(teacher_cfg, training_loop.model_layout(cfg, dims), backend=backend,
                          perform_initialization=False)
    load_weights([teacher], cfg.distill.teacher)
    loss = DistillationLoss(cfg.distill, teacher)
    datasets = task_datasets(cfg) if cfg.distill.task_data else None
    # with quant: QAD, calibrated on the task's training conversations
    quantize = ptq.training_quantizer(cfg, backend, datasets[0] if datasets else None)
    trainer = training_loop.build_trainer(cfg, backend, dims,
                                  wrap_model=partial(_student, quantize, loss.attach_teacher),
                                  forward_step=loss.forward_step, datasets=datasets)
    start = measure(trainer, loss)
    training_loop.fit(trainer)
    end = measure(trainer, loss)
    heldout = describe_heldout(trainer.valid_data, cfg.train.eval_batches
                               * cfg.train.global_batch_size, task=cfg.distill.task_data)
    report = build_report(cfg, start, end, heldout)
    if int(os.environ.get("RANK", 0)) == 0:
        write_report(report, trainer.run_dir)
    return report


def _student(quantize, attach_teacher, student):
    """The student, fake-quantized first where ``quantize`` is given (the teacher stays
    unquantized: quantization-aware distillation), with the teacher attached."""
    return attach_teacher(student if quantize is None else quantize(student))


def task_datasets(cfg: RunConfig) -> tuple:
    """(Training, held-out) datasets of the task's conversations for a training run."""
    return (task_dataset(cfg, "train", cfg.total_steps * cfg.train.global_batch_size),
            task_dataset(cfg, "valid", cfg.train.eval_batches * cfg.train.global_batch_size))


class DistillationLoss:
    """ModelOpt's KD model around the student, and the forward step that trains it.

    Losses are token sums with the token count, as the engine's LM loss, so every layout
    optimises the same objective: KL + intermediate_weight * mean cosine + lm_loss_weight * LM.
    """

    def __init__(self, options: DistillConfig, teacher):
        self.options = options
        self.teacher = teacher

    def attach_teacher(self, student):
        """The student converted to a ModelOpt DistillationModel holding the frozen teacher."""
        import modelopt.torch.distill as mtd
        from modelopt.torch.distill.plugins import megatron as mtd_megatron

        options = self.options
        kd_config = mtd_megatron.setup_distillation_config(
            mtd_megatron.DistillationConfig(
                intermediate_layer_pairs=[(f"decoder.layers.{s}", f"decoder.layers.{t}", "cosine")
                                          for s, t in options.intermediate_pairs],
                logit_kl_temperature=options.logits_temperature,
                logit_kl_topk=options.logits_topk,
                skip_lm_loss=options.lm_loss_weight == 0),
            student.config, self.teacher.config)
        model = mtd.convert(student, mode=[("kd_loss", {
            "teacher_model": self.teacher, "criterion": kd_config.criterion,
            "loss_balancer": kd_config.loss_balancer})])
        mtd_megatron.adjust_distillation_model_for_mcore(model, kd_config)
        model.compute_language_model_loss = MethodType(
            partial(_student_lm_loss, needed_in_training=options.lm_loss_weight > 0), model)
        return model

    def forward_step(self, data_iterator, model, *, report: str = "auto"):
        """Student (and teacher) forward for Megatron-Core's schedules. The engine's "lm loss"
        report carries the KD objective when training, the student's LM loss in evaluation,
        or the KL with ``report="kl"``."""
        from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
        from megatron_hybrid.engine import training_step

        batch = training_step.get_batch(data_iterator)
        per_token_lm = model(batch["tokens"], None, None, labels=batch["labels"])
        return per_token_lm, partial(self.loss, batch["loss_mask"], unwrap(model), report)

    def loss(self, loss_mask, kd_model, report: str, per_token_lm):
        import torch

        mask = loss_mask.float()
        lm_sum = (per_token_lm.float() * mask).sum()
        losses = kd_model.compute_kd_loss(skip_balancer=True,
                                          loss_reduction_fn=partial(_masked_sum, mask))
        kl_sum = next(value for key, value in losses.items() if LOGITS_LOSS in key)
        cosines = [value for key, value in losses.items() if LOGITS_LOSS not in key]
        objective = kl_sum + self.options.lm_loss_weight * lm_sum
        if cosines:
            objective = objective + self.options.intermediate_weight * sum(cosines) / len(cosines)
        if report == "auto":
            report = "objective" if kd_model.training else "lm"
        shown = {"objective": objective, "lm": lm_sum, "kl": kl_sum}[report]
        num_tokens = mask.sum().to(torch.int)
        return objective, num_tokens, {"lm loss": torch.stack([shown.detach(),
                                                               num_tokens.detach().float()])}


def _student_lm_loss(model, labels, logits, *, needed_in_training: bool):
    """The student's per-token LM loss (zeros when training without it). Megatron-Core's
    cross entropy overwrites its logits in place, so it gets a copy: the KL loss reads the
    logits its hook captured."""
    import torch

    if model.training and not needed_in_training:
        return torch.zeros_like(labels, dtype=logits.dtype)
    return type(model).compute_language_model_loss(model, labels, logits.clone())


def teacher_forward_step(data_iterator, teacher):
    """LM forward step of the bare teacher, whose own LM loss the KD model stubs out (it
    would overwrite the teacher logits the KL loss reads)."""
    from megatron_hybrid.engine import training_step

    batch = training_step.get_batch(data_iterator)
    logits = teacher(batch["tokens"], None, None).transpose(0, 1).contiguous()  # [s, b, v]
    per_token = type(teacher).compute_language_model_loss(teacher, batch["labels"], logits)
    return per_token, partial(training_step.lm_loss_func, batch["loss_mask"])


def _masked_sum(mask, loss):
    """Sum of a ModelOpt per-token loss ``(loss [b, s], tp_reduce, is_sequence_parallel)``
    over the unmasked tokens of the whole tensor-parallel group."""
    from megatron_hybrid import mcore

    values, tp_reduce, sequence_parallel = loss
    if sequence_parallel:  # this TP rank holds a slice of the sequence
        state = mcore.parallel_state
        mask = mask.chunk(state.get_tensor_model_parallel_world_size(), dim=1)[
            state.get_tensor_model_parallel_rank()]
    total = (values.float() * mask).sum()
    if tp_reduce or sequence_parallel:  # partial sums per TP rank (vocab or sequence shards)
        total = mcore.tensor_parallel.reduce_from_tensor_model_parallel_region(total)
    return total


def measure(trainer, loss: DistillationLoss) -> dict:
    """Held-out losses of teacher and student and the held-out KL, at the trainer's step."""
    with warnings.catch_warnings():  # the bare teacher's KD hook keeps what nobody reads
        warnings.filterwarnings("ignore", message="Teacher's Module")
        teacher_loss = trainer.evaluate([loss.teacher], teacher_forward_step)
    return {  # the teacher first: evaluating the student clears what the teacher left behind
        "step": trainer.state.step,
        "teacher_loss": teacher_loss,
        "student_loss": trainer.evaluate(),
        "kl": trainer.evaluate(forward_step=partial(loss.forward_step, report="kl")),
    }


# -- report -----------------------------------------------------------------------------------

def build_report(cfg: RunConfig, start: dict, end: dict, heldout_data: str) -> dict:
    gap = start["student_loss"] - start["teacher_loss"]
    closed = (start["student_loss"] - end["student_loss"]) / gap if gap >= MIN_GAP else None
    return {"teacher": cfg.distill.teacher, "student": cfg.checkpoint.load,
            "output": str(Path(cfg.resolved_output_dir) / "checkpoints"),
            "distill": dataclasses.asdict(cfg.distill), "heldout_data": heldout_data,
            "start": start, "end": end, "gap": gap, "min_gap": MIN_GAP, "gap_closed": closed}


def write_report(report: dict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))


def format_markdown(report: dict) -> str:
    start, end = report["start"], report["end"]
    rows = [(name, start[key], end[key]) for name, key in (
        ("student held-out loss", "student_loss"), ("teacher held-out loss", "teacher_loss"),
        ("held-out KL(teacher || student)", "kl"))]
    return "\n".join([
        "# Distillation report", "",
        f"- teacher: `{report['teacher']}`; student from `{report['student']}`",
        f"- settings: `{json.dumps(report['distill'])}`",
        f"- held-out data: {report['heldout_data']}",
        f"- student-teacher gap at the start: {report['gap']:.4f} nats; closed: "
        f"{_gap_closed(report, '.1%')}", "",
        f"| | step {start['step']} | step {end['step']} |", "|---|---|---|",
        *(f"| {name} | {before:.4f} | {after:.4f} |" for name, before, after in rows), ""])


def format_summary(report: dict) -> str:
    start, end = report["start"], report["end"]
    return (f"distilled -> {report['output']}: student held-out loss {start['student_loss']:.4f}"
            f" -> {end['student_loss']:.4f} (teacher {end['teacher_loss']:.4f}, gap closed "
            f"{_gap_closed(report, '.0%')}), KL {start['kl']:.4f} -> {end['kl']:.4f}; held-out "
            f"data: {report['heldout_data']}")


def _gap_closed(report: dict, spec: str) -> str:
    closed = report["gap_closed"]
    if closed is None:
        return f"n/a (gap under {report['min_gap']} nats)"
    return format(closed, spec)
