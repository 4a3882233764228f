"""The prune stage: Minitron pruning (ModelOpt ``mcore_minitron``) of a trained checkpoint.

``megatron-hybrid prune RECIPE [key=value ...]`` loads ``checkpoint.load`` (saved at any TP/PP),
runs the calibration samples through it at TP=1 (PP allowed) so ModelOpt can rank neurons,
heads and layers by their activations, and keeps the best-ranked ones:

- manual mode (``prune.export_config``): the given sizes, checked before anything is loaded,
  and with ``prune.drop_layers`` the given layers dropped instead of the least important;
- search mode (``prune.max_params``, or ``prune.serve_gpu``: the parameters that GPU can hold
  while serving ``prune.serve_context`` tokens, by the planner): the largest candidate sizes
  under the budget, each scored on held-out loss, the best kept.

Held-out loss is measured on ``data``'s validation split, or with ``prune.task_data`` on the
task's held-out conversations; the report names which (``heldout_data``).

Output in the run directory: ``checkpoints/step_000000`` (meta.json holds the pruned model,
whose pattern lost the dropped layers), ``model.yaml`` (that model as a recipe section),
``config.yaml``, and the report ``prune_report.{md,json}`` with ``layer_importance.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.stages import prune_heterogeneous
from megatron_hybrid.stages.common import (
    checkpoint_model,
    require_heldout_data,
    with_modelopt_spec,
)
from megatron_hybrid.stages.config import PRUNABLE, PruneConfig

if TYPE_CHECKING:
    from megatron_hybrid.run_config import RunConfig  # the composition root, above this layer

REPORT = "prune_report"


# -- checks before anything is loaded ---------------------------------------------------------

def check_request(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the model saved in ``checkpoint.load`` after refusing, in one line each,
    anything that would fail after loading: no target, a missing checkpoint, a recipe model
    that is not the checkpoint's, sizes the model cannot be pruned to, a layout ModelOpt
    cannot prune at."""
    cfg = with_modelopt_spec(cfg, "prune")  # first: what the stage builds is validated
    cfg.validate()
    if cfg.prune.mode is None:
        raise ConfigError("nothing to prune: set prune.export_config={hidden_size: ..., ...} "
                          "(given sizes), prune.max_params=N or prune.serve_gpu=a10g (search "
                          "under a parameter or memory budget)")
    parallel = cfg.parallel
    if parallel.tp != 1 or parallel.cp != 1:
        raise ConfigError(f"pruning runs at parallel.tp=1 and parallel.cp=1 (ModelOpt "
                          f"mcore_minitron), got tp={parallel.tp}, cp={parallel.cp}: the "
                          f"checkpoint may come from any layout; set parallel.tp=1 "
                          f"parallel.cp=1 (parallel.pp may stay)")
    for name in ("calibration_samples", "heldout_samples"):
        if getattr(cfg.prune, name) % cfg.train.micro_batch_size:
            raise ConfigError(f"prune.{name} ({getattr(cfg.prune, name)}) must be a multiple "
                              f"of train.micro_batch_size ({cfg.train.micro_batch_size})")
    if not cfg.prune.task_data:
        require_heldout_data(cfg, "pruning")
    if cfg.model.layer_overrides:  # the checkpoint's, or checkpoint_model refuses it
        raise ConfigError("model.layer_overrides: Minitron's uniform pruning cannot rank "
                          "per-layer sizes: prune the checkpoint they were pruned from")
    source = checkpoint_model(cfg, role="checkpoint to prune")
    cfg.prune.check_against(source)
    if cfg.prune.per_layer_ffn:
        prune_heterogeneous.check_request(cfg.prune, source, parallel.pp)
    parameter_budget(cfg.prune, source)  # refuses a budget that leaves nothing
    return dataclasses.replace(cfg, model=source)


# -- pruning ----------------------------------------------------------------------------------

def prune(cfg: RunConfig, backend: str, dims) -> dict:
    """Prune ``checkpoint.load`` as ``cfg.prune`` asks; save the pruned checkpoint and the
    report in the run directory; return the report."""
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.engine import training_loop
    from megatron_hybrid.model.build import build_model
    from megatron_hybrid.parallel import process_groups

    process_groups.seed_everything(cfg.train.seed)
    data = CalibrationData(cfg)
    layout = training_loop.model_layout(cfg, dims)
    model = build_model(cfg.model, layout, backend=backend, perform_initialization=False)
    dist_checkpoint.load_weights([model], cfg.checkpoint.load)
    before = {"params": param_count(model), "heldout_loss": data.heldout_loss(model)}
    layer_numbers = {id(layer): layer.layer_number for layer in model.decoder.layers}
    search = run_minitron(model, cfg, data, backend)
    dropped = dropped_layers(model, layer_numbers, cfg.model.num_layers)
    pruned_cfg = pruned_model_config(cfg.model, model, dropped)
    if cfg.prune.per_layer_ffn:
        pruned_cfg, state = per_layer_ffn(cfg, model, layer_numbers, pruned_cfg, search, data,
                                          layout, backend)
    else:
        state = model.state_dict()
    del model
    pruned = build_model(pruned_cfg, layout, backend=backend, perform_initialization=False)
    pruned.load_state_dict(state)  # strict: the new shapes must match
    after = {"params": param_count(pruned), "heldout_loss": data.heldout_loss(pruned)}
    report = build_report(cfg, pruned_cfg, dropped, search, before, after, data.description)
    save_outputs(cfg, pruned_cfg, pruned, data.tokenizer, report, dims)
    return report


class CalibrationData:
    """Calibration samples (training split) and held-out samples (validation split, or the
    task's held-out conversations with ``prune.task_data``)."""

    def __init__(self, cfg: RunConfig):
        from megatron_hybrid.data.datasets import build_datasets
        from megatron_hybrid.data.tokenizer import load_tokenizer
        from megatron_hybrid.stages.common import describe_heldout, task_dataset

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        options = cfg.prune
        self.train, self.valid = build_datasets(
            cfg.data, self.tokenizer, seq_length=cfg.seq_length,
            train_samples=options.calibration_samples, valid_samples=options.heldout_samples)
        if options.task_data:
            self.valid = task_dataset(cfg, "valid", options.heldout_samples)
        self.description = describe_heldout(self.valid, options.heldout_samples,
                                            task=options.task_data)
        """What the held-out loss is measured on (the report's ``heldout_data``)."""

    def forward(self, model, dataset, samples: int) -> float:
        """Mean per-token loss of ``model`` over the first ``samples`` of ``dataset``."""
        from megatron_hybrid.data.datasets import microbatch_iterator
        from megatron_hybrid.engine import training_step

        micro = self.cfg.train.micro_batch_size
        batches = microbatch_iterator(dataset, start_sample=0, micro_batch_size=micro,
                                      num_microbatches=samples // micro, dp_rank=0, dp_size=1)
        return training_step.eval_loss([model], batches, num_microbatches=samples // micro,
                                micro_batch_size=micro, seq_length=self.cfg.seq_length)

    def calibrate(self, model) -> None:
        self.forward(model, self.train, self.cfg.prune.calibration_samples)

    def heldout_loss(self, model) -> float:
        return self.forward(model, self.valid, self.cfg.prune.heldout_samples)


def per_layer_ffn(cfg: RunConfig, model, layer_numbers: dict[int, int], full: ModelConfig,
                  search: dict, data: CalibrationData, layout,
                  backend: str) -> tuple[ModelConfig, dict]:
    """``prune.per_layer_ffn``: the heterogeneous config and its weights, from ``model``
    pruned with its MLP channels sorted but whole (``full`` is its config). Records in
    ``search["per_layer_ffn"]`` the widths and, for comparison, the held-out loss of the
    uniform prune to the same target (built from the same sorted channels)."""
    from megatron_hybrid.model.build import build_model

    target, divisor = cfg.prune.export_config["ffn_hidden_size"], cfg.prune.ffn_hidden_size_divisor
    importance = prune_heterogeneous.layer_importance(
        search.pop("activations"), model, layer_numbers, full.layer_pattern.layers)
    state, uniform_cfg = model.state_dict(), full.replace(ffn_hidden_size=target)
    uniform = build_model(uniform_cfg, layout, backend=backend, perform_initialization=False)
    uniform.load_state_dict(prune_heterogeneous.sliced_state(
        state, dict.fromkeys(importance, target)))
    widths = prune_heterogeneous.ffn_widths(importance, target, divisor)
    search["per_layer_ffn"] = {"widths": [widths[index] for index in sorted(widths)],
                               "uniform": {"params": param_count(uniform),
                                           "heldout_loss": data.heldout_loss(uniform)}}
    return (prune_heterogeneous.heterogeneous_config(uniform_cfg, widths),
            prune_heterogeneous.sliced_state(state, widths))


def run_minitron(model, cfg: RunConfig, data: CalibrationData, backend: str) -> dict:
    """Prune ``model`` in place with ModelOpt. Returns ``layer_scores``: each layer's
    importance by global 1-based number (1 - cosine of its input and output on the
    calibration data), in search mode ``candidates``: the sizes scored, their parameters
    and held-out loss, and with ``prune.per_layer_ffn`` (MLP widths left whole)
    ``activations``: ModelOpt's per-module activation statistics."""
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    register_norm()
    options = cfg.prune
    mode_config = get_mcore_minitron_config(
        hidden_size_divisor=options.hidden_size_divisor,
        ffn_hidden_size_divisor=options.ffn_hidden_size_divisor,
        mamba_head_dim_divisor=options.mamba_head_dim_divisor,
        num_moe_experts_divisor=options.num_moe_experts_divisor,
        num_layers_divisor=options.num_layers_divisor)
    budget = parameter_budget(options, cfg.model)
    constraints, search = minitron_request(options, data, budget)
    if options.per_layer_ffn:
        constraints = prune_heterogeneous.full_width_request(constraints, cfg.model)
    with _gloo_fix(backend), _modelopt_log(Path(cfg.resolved_output_dir)):
        _, searcher_state = mtp.prune(model, mode=[("mcore_minitron", mode_config)],
                                      constraints=constraints, dummy_input=None, config=search)
        if options.drop_layers:
            drop_named_layers(model, options.drop_layers)
    scored = searcher_state["top_k_candidates_per_constraint"].get(budget, [])
    return {"layer_scores": {int(number): float(score)
                             for number, score in searcher_state["layer_scores"].items()},
            "candidates": [{"sizes": candidate.ss_config, "params": int(candidate.params),
                            "heldout_loss": -candidate.score} for candidate in scored],
            **({"activations": searcher_state["activations_per_rank"][0]}  # one stage
               if options.per_layer_ffn else {})}


def parameter_budget(options: PruneConfig, model: ModelConfig) -> float | None:
    """Search mode's parameter budget: ``max_params``, or the bf16 weights ``serve_gpu`` can
    hold next to the caches and prefill of serving ``serve_context`` tokens, as the planner
    counts them for the unpruned ``model`` (an upper bound of the pruned model's)."""
    if options.serve_gpu is None:
        return options.max_params
    from megatron_hybrid.planning import planner

    gpu, memory = planner.GPUS[options.serve_gpu], planner.inference_memory(
        model, context=options.serve_context)
    budget = (gpu.usable_bytes - (memory.total - memory.weights)) / 2
    if budget <= 0:
        raise ConfigError(f"prune.serve_gpu={options.serve_gpu}: serving "
                          f"{options.serve_context:,} tokens leaves no memory for weights "
                          f"(caches and prefill alone need {memory.total - memory.weights:,.0f}"
                          f" bytes): lower prune.serve_context or choose a larger GPU")
    return float(int(budget))


def minitron_request(options: PruneConfig, data: CalibrationData,
                     budget: float | None) -> tuple[dict, dict]:
    """ModelOpt's constraints and search config for the two modes."""
    search = {"forward_loop": data.calibrate}
    if options.mode == "manual":
        return {"export_config": dict(options.export_config or {})}, search
    search.update(score_func=lambda candidate: -data.heldout_loss(candidate),
                  max_width_pruning=options.max_width_pruning,
                  max_depth_pruning=options.max_depth_pruning,
                  hparams_to_skip=list(options.skip_hparams) or None, top_k=options.top_k)
    return {"params": budget}, search


def drop_named_layers(model, indices: list[int]) -> None:
    """Depth pruning of the layers ``prune.drop_layers`` names (0-based): ModelOpt's own layer
    dropping, and the hybrid pattern shortened as its depth pruning does."""
    from modelopt.torch.prune.plugins.mcore_minitron import drop_mcore_language_model_layers

    drop_mcore_language_model_layers(model, layers_to_drop=[index + 1 for index in indices])
    model.hybrid_override_pattern = "".join(
        symbol for index, symbol in enumerate(model.hybrid_override_pattern)
        if index not in indices)


def _gloo_fix(backend: str):
    if backend != "cpu":
        return contextlib.nullcontext()
    from megatron_hybrid.backends.cpu import gloo_accepts_scalar_all_gather

    return gloo_accepts_scalar_all_gather()


@contextlib.contextmanager
def _modelopt_log(run_dir: Path):
    """ModelOpt prints its whole search (importance tensors included): to ``modelopt.log``
    in the run directory (rank 0), not the terminal."""
    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "modelopt.log" if _is_rank_zero() else Path(os.devnull)
    with path.open("w") as log, contextlib.redirect_stdout(log):
        yield


def register_norm() -> None:
    """Teach ModelOpt to prune the hidden size of the cpu backend's norm (like its
    ``_DynamicFusedLayerNorm`` for Megatron-Core's fused norm)."""
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    from megatron_hybrid.model.specs import TorchRMSNorm

    if TorchRMSNorm in DMRegistry:
        return

    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)

    DMRegistry.register({TorchRMSNorm: "megatron_hybrid.model.specs.TorchRMSNorm"})(
        _DynamicTorchRMSNorm)


def param_count(model) -> int:
    """Parameters of the whole model (summed over pipeline stages)."""
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_param_count

    return int(get_mcore_param_count(model))


def dropped_layers(model, layer_numbers: dict[int, int], num_layers: int) -> list[int]:
    """0-based global indices of the layers depth pruning removed, over every stage
    (``layer_numbers``: this stage's layers by id, with their original 1-based numbers)."""
    import torch.distributed as dist

    from megatron_hybrid import mcore

    kept = [layer_numbers[id(layer)] for layer in model.decoder.layers]
    group = mcore.parallel_state.get_pipeline_model_parallel_group()
    every_stage: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every_stage, kept, group=group)
    kept_all = {number for stage in every_stage for number in stage}
    return [index for index in range(num_layers) if index + 1 not in kept_all]


def pruned_model_config(source: ModelConfig, pruned, dropped: list[int]) -> ModelConfig:
    """The pruned model's config: ModelOpt's new sizes and the saved pattern without the
    dropped layers (its ``|`` stage marks kept), which must be the layers ModelOpt left in
    ``pruned.hybrid_override_pattern`` (Megatron's stack keeps a stale copy)."""
    sizes = {name: getattr(pruned.config, name) for name in PRUNABLE if name != "num_layers"}
    pattern = source.layer_pattern.drop_layers(dropped)
    if pattern.layers != pruned.hybrid_override_pattern:
        raise RuntimeError(f"dropping layers {dropped} of {source.pattern!r} gives "
                           f"{pattern.layers!r}, but ModelOpt's pruned model has "
                           f"{pruned.hybrid_override_pattern!r}")
    return source.replace(pattern=pattern.text, **sizes)


# -- outputs ----------------------------------------------------------------------------------

def build_report(cfg: RunConfig, pruned_cfg: ModelConfig, dropped: list[int], search: dict,
                 before: dict, after: dict, heldout_data: str) -> dict:
    source, layer_scores = cfg.model, search["layer_scores"]
    layers = source.layer_pattern.layers
    return {
        "checkpoint": cfg.checkpoint.load,
        "mode": cfg.prune.mode,
        "target": manual_target(cfg.prune) if cfg.prune.mode == "manual" else {
            "max_params": parameter_budget(cfg.prune, cfg.model),
            **({"serve_gpu": cfg.prune.serve_gpu, "serve_context": cfg.prune.serve_context}
               if cfg.prune.serve_gpu else {})},
        "sizes": {name: [getattr(source, name), getattr(pruned_cfg, name)] for name in PRUNABLE
                  if getattr(source, name) != getattr(pruned_cfg, name)},
        "pattern": [source.pattern, pruned_cfg.pattern],
        "dropped_layers": [{"index": i, "kind": layers[i]} for i in dropped],
        "layer_importance": [layer_scores[number] for number in sorted(layer_scores)],
        "params": [before["params"], after["params"]],
        "heldout_loss": [before["heldout_loss"], after["heldout_loss"]],
        "heldout_data": heldout_data,
        "calibration_samples": cfg.prune.calibration_samples,
        "heldout_samples": cfg.prune.heldout_samples,
        "candidates": search["candidates"],
        **({"per_layer_ffn": search["per_layer_ffn"]} if "per_layer_ffn" in search else {}),
    }


def manual_target(options: PruneConfig) -> dict:
    """Manual mode's request as the report names it: the sizes, and the layers named."""
    named = {"drop_layers": options.drop_layers} if options.drop_layers is not None else {}
    return {**(options.export_config or {}), **named}


def save_outputs(cfg: RunConfig, pruned_cfg: ModelConfig, pruned, tokenizer, report: dict,
                 dims) -> Path:
    """The pruned checkpoint (every rank), then config, model section and report (rank 0)."""
    from megatron_hybrid import sections
    from megatron_hybrid.checkpoint.dist_checkpoint import Checkpointer, TrainState

    run_dir = Path(cfg.resolved_output_dir)
    pruned_run = dataclasses.replace(cfg, model=pruned_cfg)
    checkpointer = Checkpointer(
        run_dir, save_interval=None, keep_last=cfg.checkpoint.keep_last,
        meta={"model": pruned_cfg.to_dict(), "tokenizer": tokenizer.unique_identifiers,
              "layout": dims.layout,
              "pruned_from": cfg.checkpoint.load},
        config_yaml=sections.dump_yaml(pruned_run))
    saved = checkpointer.save(TrainState(), [pruned], None, None)
    if _is_rank_zero():
        report["output"] = str(saved)
        sections.save_resolved(pruned_run, run_dir / "config.yaml")
        write_model_section(pruned_cfg, run_dir / "model.yaml")
        write_report(report, run_dir)
    return saved


def write_model_section(model: ModelConfig, path: Path) -> None:
    """The pruned model as a recipe fragment (``base:`` it from a later stage's recipe)."""
    import yaml

    path.write_text(yaml.safe_dump({"model": model.to_dict()}, sort_keys=False))


def write_report(report: dict, run_dir: Path) -> None:
    from megatron_hybrid.engine import metrics
    from megatron_hybrid.stages.common import write_summary

    (run_dir / f"{REPORT}.json").write_text(json.dumps(report, indent=2))
    write_summary(run_dir, heldout_loss=report["heldout_loss"][1])
    (run_dir / f"{REPORT}.md").write_text(format_markdown(report))
    dropped = ", ".join(str(layer["index"]) for layer in report["dropped_layers"]) or "none"
    metrics.plot_curves(
        {"1 - cos(layer in, layer out)": list(enumerate(report["layer_importance"]))},
        run_dir / "layer_importance.png", title=f"Layer importance (dropped: {dropped})",
        xlabel="layer (0-based)", ylabel="importance")


def format_markdown(report: dict) -> str:
    params, losses = report["params"], report["heldout_loss"]
    lines = [
        "# Minitron pruning report", "",
        f"- checkpoint: `{report['checkpoint']}` -> `{report['output']}`",
        f"- mode: {report['mode']}, target: `{json.dumps(report['target'])}`",
        f"- pattern: `{report['pattern'][0]}` -> `{report['pattern'][1]}`",
        f"- parameters: {params[0]:,} -> {params[1]:,} ({params[1] / params[0]:.1%})",
        f"- held-out loss ({report['heldout_samples']} samples of {report['heldout_data']}): "
        f"{losses[0]:.4f} -> {losses[1]:.4f}",
        "", "| size | before | after |", "|---|---|---|",
        *(f"| {name} | {old} | {new} |" for name, (old, new) in report["sizes"].items()),
        "", "| dropped layer | kind | importance |", "|---|---|---|",
        *(f"| {layer['index']} | {layer['kind']} | "
          f"{report['layer_importance'][layer['index']]:.4g} |"
          for layer in report["dropped_layers"]),
        *(["", "| candidate sizes | parameters | held-out loss |", "|---|---|---|"]
          if report["candidates"] else []),
        *(f"| `{json.dumps(c['sizes'])}` | {c['params']:,} | {c['heldout_loss']:.4f} |"
          for c in report["candidates"]),
        *_per_layer_lines(report.get("per_layer_ffn")),
        "", "Per-layer importance (1 - cosine of layer input and output on the calibration "
        "data): `layer_importance.png`.", "",
    ]
    return "\n".join(lines)


def _per_layer_lines(per_layer: dict | None) -> list[str]:
    if per_layer is None:
        return []
    uniform = per_layer["uniform"]
    return ["", f"Per-layer FFN widths (MLP layers in order): {per_layer['widths']}; the "
            f"uniform prune to the same target: {uniform['params']:,} parameters, held-out "
            f"loss {uniform['heldout_loss']:.4f}."]


def format_summary(report: dict) -> str:
    params, losses = report["params"], report["heldout_loss"]
    return (f"pruned -> {report['output']}: {params[0]:,} -> {params[1]:,} parameters, "
            f"held-out loss {losses[0]:.4f} -> {losses[1]:.4f} ({report['heldout_data']}), "
            f"pattern {report['pattern'][1]}")


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", 0)) == 0
