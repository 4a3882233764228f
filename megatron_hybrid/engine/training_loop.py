"""The training loop: one engine for pretraining, SFT and distillation, on CPU and GPU.

``run(cfg)`` sets up (backend, process groups, model, optimizer, data, checkpoints, metrics),
resumes when the run has a checkpoint, trains, and always tears the process groups down.
The loop stays short: the checkpointer decides when to save, evaluation is a call.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_hybrid import backends, reliability, sections
from megatron_hybrid.checkpoint.dist_checkpoint import (
    Checkpointer,
    TrainState,
    check_matches,
    load_weights,
)
from megatron_hybrid.data.datasets import build_datasets, microbatch_iterator
from megatron_hybrid.data.tokenizer import load_tokenizer
from megatron_hybrid.engine import expert_load, metrics, training_step
from megatron_hybrid.model.build import ModelLayout, build_model, tp_comm_overlap_buffers
from megatron_hybrid.parallel import process_groups

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer


@dataclass
class Trainer:
    cfg: RunConfig
    run_dir: Path
    dims: process_groups.ParallelDims
    model_chunks: list
    optimizer: object
    scheduler: object
    checkpointer: Checkpointer
    train_data: object
    valid_data: object
    state: TrainState
    forward_step: Callable = training_step.lm_forward_step
    """(data iterator, model) -> (output, loss function), for training and evaluation."""
    expert_meter: expert_load.ExpertLoadMeter | None = None
    """Counts each expert's routed tokens (models with MoE layers)."""

    @property
    def num_microbatches(self) -> int:
        train = self.cfg.train
        return train.global_batch_size // (train.micro_batch_size * self.dims.dp)

    def batches(self, dataset, start_sample: int):
        from megatron_hybrid import mcore

        return microbatch_iterator(
            dataset, start_sample=start_sample, micro_batch_size=self.cfg.train.micro_batch_size,
            num_microbatches=self.num_microbatches,
            dp_rank=mcore.parallel_state.get_data_parallel_rank(), dp_size=self.dims.dp,
            num_workers=self.cfg.data.num_workers)

    def evaluate(self, model_chunks: list | None = None,
                 forward_step: Callable | None = None) -> float | None:
        """Validation loss of this run's model (or ``model_chunks``, e.g. a distillation
        teacher) through its forward step (or ``forward_step``); None without validation data."""
        if self.valid_data is None:
            return None
        return training_step.eval_loss(
            model_chunks or self.model_chunks, self.batches(self.valid_data, 0),
            num_microbatches=self.num_microbatches * self.cfg.train.eval_batches,
            micro_batch_size=self.cfg.train.micro_batch_size, seq_length=self.cfg.seq_length,
            forward_step=forward_step or self.forward_step)

    def train(self, tracker: metrics.MetricsTracker) -> TrainState:
        cfg, state, total = self.cfg, self.state, self.cfg.total_steps
        data = self.batches(self.train_data, state.consumed_samples)
        saved = None
        with reliability.Watchdog(max_bad_steps=cfg.train.max_bad_steps, run_dir=self.run_dir,
                                  loss_spike_factor=cfg.train.loss_spike_factor,
                                  device=backends.device()) as watchdog:
            while state.step < total and not watchdog.stopping:
                started = time.perf_counter()
                result = training_step.train_step(
                    self.model_chunks, self.optimizer, data,
                    num_microbatches=self.num_microbatches,
                    micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.seq_length,
                    forward_step=reliability.with_nan_loss(self.forward_step, state.step + 1))
                if self.optimizer.update_applied:  # as Megatron-LM: a skipped step keeps its LR
                    self.scheduler.step(increment=1)
                # Tokens processed, not the loss's (SFT's are a fraction): throughput and MFU.
                tokens = cfg.train.global_batch_size * cfg.seq_length
                state.step += 1
                state.consumed_samples += cfg.train.global_batch_size
                state.tokens += tokens
                loads = (self.expert_meter.interval(state.step) if self.expert_meter is not None
                         and tracker.is_log_step(state.step) else None)
                tracker.step(state.step, loss=result.loss, grad_norm=result.grad_norm,
                             lr=self.optimizer.param_groups[0]["lr"], tokens=tokens,
                             seconds=time.perf_counter() - started, extra=loads)
                watchdog.after_step(state.step, loss=result.loss, grad_norm=result.grad_norm,
                                    applied=self.optimizer.update_applied)
                if _due(state.step, cfg.train.eval_interval) or state.step == total:
                    tracker.log_eval(state.step, self.evaluate())
                if self.checkpointer.should_save(state.step,
                                                 final=state.step == total or watchdog.stopping):
                    training_step.sync_params(self.model_chunks)
                    saved = self.checkpointer.save(state, self.model_chunks, self.optimizer,
                                                   self.scheduler)
            watchdog.finish(state.step, saved)
        training_step.sync_params(self.model_chunks)  # the caller may read the weights next
        return state


def run(cfg: RunConfig) -> TrainState:
    """Train ``cfg`` in this process (one rank of a torchrun job, or alone)."""
    with session(cfg) as (backend, dims):
        return fit(build_trainer(cfg, backend, dims))


@contextlib.contextmanager
def session(cfg: RunConfig) -> Iterator[tuple[str, process_groups.ParallelDims]]:
    """Backend and process groups for ``cfg`` (with Transformer Engine's userbuffers where
    ``parallel.tp_comm_overlap`` asks for them), torn down on exit: (backend, dims)."""
    backend = backends.install(cfg.parallel.backend,
                               need_transformer_engine=cfg.model.needs_transformer_engine)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg.validate(world_size)
    cfg.validate_for_backend(backend)
    dims = process_groups.ParallelDims.of(cfg.parallel, world_size)
    process_groups.init_distributed(dims, backend=backend,
                              timeout_minutes=cfg.parallel.timeout_minutes)
    try:
        with tp_comm_overlap_buffers(cfg.model, model_layout(cfg, dims),
                                     seq_length=cfg.seq_length,
                                     micro_batch_size=cfg.train.micro_batch_size):
            yield backend, dims
    finally:
        process_groups.destroy_distributed()


def run_stage(cfg: RunConfig, stage: Callable[[str, process_groups.ParallelDims], dict],
              summary: Callable[[dict], str]) -> int:
    """Run a stage (prune, distill, SFT, DPO: ``stage(backend, dims) -> report``) in a session
    of ``cfg``; rank 0 prints ``summary(report)``."""
    with session(cfg) as (backend, dims):
        report = stage(backend, dims)
    if int(os.environ.get("RANK", 0)) == 0:  # the process groups are gone by now
        print(summary(report))
    return 0


def fit(trainer: Trainer) -> TrainState:
    """Train to the end of the run with metrics, then plot the loss curve."""
    cfg = trainer.cfg
    with _tracker(cfg, trainer, trainer.dims.world_size) as tracker:
        state = trainer.train(tracker)
    if dist.get_rank() == 0 and cfg.logging.plot:
        metrics.plot_loss_curve(trainer.run_dir / "metrics.jsonl",
                                trainer.run_dir / "loss.png", title=cfg.name)
    if dist.get_rank() == 0 and (trainer.run_dir / expert_load.HISTORY).exists():
        if cfg.logging.plot:
            expert_load.plot(trainer.run_dir, cfg.name)
        expert_load.write_report(trainer.run_dir, cfg.name)
    return state


def build_trainer(cfg: RunConfig, backend: str, dims: process_groups.ParallelDims, *,
                  wrap_model: Callable | None = None,
                  forward_step: Callable = training_step.lm_forward_step,
                  datasets: tuple | None = None) -> Trainer:
    """The trainer of ``cfg``; ``wrap_model`` (e.g. attaching a distillation teacher) gets the
    model after its initial weights are loaded and before DDP wraps it. ``datasets``
    (training, held-out) replaces the pretraining data of ``cfg.data``."""
    run_dir = Path(cfg.resolved_output_dir)
    tokenizer = load_tokenizer(cfg.tokenizer)
    checkpointer = Checkpointer(
        run_dir, save_interval=cfg.checkpoint.save_interval, keep_last=cfg.checkpoint.keep_last,
        meta={"model": cfg.model.to_dict(), "tokenizer": tokenizer.unique_identifiers,
              "layout": dims.layout,
              **({"peft": cfg.peft.to_dict()} if cfg.peft.enabled else {})},
        config_yaml=sections.dump_yaml(cfg))
    latest = _starting_checkpoint(cfg, checkpointer)
    # Data before the model: a bad data file is refused before anything heavy is built.
    if datasets is None:
        with collective_timeout(cfg.parallel.index_build_timeout_minutes,
                                then=cfg.parallel.timeout_minutes):
            datasets = build_datasets(
                cfg.data, tokenizer, seq_length=cfg.seq_length,
                train_samples=cfg.total_steps * cfg.train.global_batch_size,
                valid_samples=cfg.train.eval_batches * cfg.train.global_batch_size)
    train_data, valid_data = datasets
    process_groups.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, model_layout(cfg, dims), backend=backend, peft=cfg.peft)
    if latest is None and cfg.checkpoint.load:
        _print0(f"initial weights from {cfg.checkpoint.load}")
        load_weights([model], cfg.checkpoint.load)
    if wrap_model is not None:
        model = wrap_model(model)
    chunks = [training_step.wrap_ddp(
        model, use_distributed_optimizer=cfg.parallel.distributed_optimizer, backend=backend)]
    optimizer = reliability.SkipNonFinite(
        training_step.build_optimizer(chunks, optimizer_settings(cfg)), chunks)
    scheduler = training_step.build_scheduler(
        optimizer, kind=cfg.scheduler.kind, lr=cfg.optimizer.lr, min_lr=cfg.optimizer.min_lr,
        warmup_steps=cfg.scheduler.warmup_steps, max_steps=cfg.total_steps,
        decay_fraction=cfg.scheduler.decay_fraction,
        wsd_decay_style=cfg.scheduler.wsd_decay_style, weight_decay=cfg.optimizer.weight_decay)
    state = TrainState()
    if latest is not None:
        _print0(f"resuming from {latest}")
        state = checkpointer.resume(latest, chunks, optimizer, scheduler)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        sections.save_resolved(cfg, run_dir / "config.yaml")
    return Trainer(cfg, run_dir, dims, chunks, optimizer, scheduler, checkpointer, train_data,
                   valid_data, state, forward_step, _expert_load_meter(cfg, chunks, run_dir))


def _expert_load_meter(cfg: RunConfig, chunks: list,
                       run_dir: Path) -> expert_load.ExpertLoadMeter | None:
    from megatron_hybrid import mcore

    if "E" not in cfg.model.layer_pattern.layers:
        return None
    return expert_load.ExpertLoadMeter(
        chunks, cfg.model, pp=mcore.parallel_state.get_pipeline_model_parallel_world_size(),
        pp_rank=mcore.parallel_state.get_pipeline_model_parallel_rank(), run_dir=run_dir,
        is_logging_rank=dist.get_rank() == 0)


def _starting_checkpoint(cfg: RunConfig, checkpointer: Checkpointer) -> Path | None:
    """The run's own latest checkpoint to resume (None: a fresh start), after refusing one of
    another model or tokenizer, or a ``checkpoint.load`` of another model, in one line."""
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        check_matches(latest, model=checkpointer.meta["model"],
                      tokenizer=checkpointer.meta["tokenizer"])
    elif cfg.checkpoint.load:
        check_matches(cfg.checkpoint.load, model=checkpointer.meta["model"])
    return latest


@contextlib.contextmanager
def collective_timeout(minutes: float, *, then: float):
    """Let the default group's collectives wait ``minutes`` inside the block, ``then`` after:
    Megatron-Core builds the dataset indices on rank 0 while the others wait at a barrier,
    which must not fail the run at the usual timeout."""
    set_timeout = dist.distributed_c10d._set_pg_timeout
    set_timeout(datetime.timedelta(minutes=minutes))
    try:
        yield
    finally:
        set_timeout(datetime.timedelta(minutes=then))


def model_layout(cfg: RunConfig, dims: process_groups.ParallelDims) -> ModelLayout:
    """How this run lays its model out across ranks."""
    return ModelLayout(tp=dims.tp, pp=dims.pp, cp=dims.cp, ep=dims.ep, etp=dims.etp,
                       moe_dispatcher=cfg.parallel.moe_dispatcher,
                       sequence_parallel=cfg.parallel.sequence_parallel,
                       tp_comm_overlap=cfg.parallel.tp_comm_overlap,
                       precision=cfg.train.precision, recompute=cfg.train.recompute)


def optimizer_settings(cfg: RunConfig) -> training_step.OptimizerSettings:
    """The optimizer settings of ``cfg`` (its ``optimizer`` and ``parallel`` sections)."""
    opt = cfg.optimizer
    return training_step.OptimizerSettings(
        lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)


def _tracker(cfg: RunConfig, trainer: Trainer, world_size: int) -> metrics.MetricsTracker:
    precision = "bf16" if cfg.train.precision != "fp32" else "fp32"
    _, peak = metrics.device_peak_flops(precision)
    flops = metrics.flops_per_token(cfg.model, cfg.seq_length)["total"]
    return metrics.MetricsTracker(
        trainer.run_dir, is_logging_rank=dist.get_rank() == 0, flops_per_token=flops,
        peak_flops=peak, world_size=world_size, total_steps=cfg.total_steps,
        log_interval=cfg.train.log_interval, progress=cfg.logging.progress_bar,
        tensorboard=cfg.logging.tensorboard, tokens_seen=trainer.state.tokens)


def _print0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _due(step: int, interval: int) -> bool:
    """Every ``interval`` steps; an interval of 0 means never."""
    return bool(interval) and step % interval == 0
