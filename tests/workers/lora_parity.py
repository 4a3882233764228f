"""torchrun worker: train the same base weights and LoRA adapters under several layouts.

The TP=1 layout draws its adapters' B non-zero (A is non-zero from its init), as training
leaves them, and saves base and adapters; every layout loads that checkpoint (resharded over
TP and PP) and trains the adapters on the batches of ``layout_parity``. Rank 0 writes, with
``torch.save`` to argv[1]:

- ``runs``: {layout: {"loss": [...], "grad_norm": [...]}} per step;
- ``gradients``: {layout: {adapter: gradient}}, the first step's reduced gradient of every
  adapter factor, under the TP=1 model's names and shapes (through a checkpoint, as
  ``layout_parity`` does).

The control layout ``MUTANT`` is TP=2 with B zeroed after the load (adapters that were not
loaded): its loss and A gradients must differ.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from layout_parity import FirstStepGradients, model_config, train_and_save_gradients

from megatron_hybrid import backends

MUTANT = "tp2_b_zeroed"
LAYOUTS = {  # name: (tp, pp, cp, sequence_parallel)
    "tp1": (1, 1, 1, False),
    "tp2": (2, 1, 1, False),
    "tp2sp": (2, 1, 1, True),
    "pp2": (1, 2, 1, False),
    "cp2": (1, 1, 2, False),
    MUTANT: (2, 1, 1, False),
}


def build(model_cfg, peft, tp: int, pp: int, cp: int, sp: bool):
    from megatron_hybrid.model.build import ModelLayout, build_model

    return build_model(model_cfg, ModelLayout(tp=tp, pp=pp, cp=cp, sequence_parallel=sp),
                       backend="cpu", peft=peft)


def randomize_b(model) -> None:
    from megatron_hybrid.model import adapters

    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, linear in adapters.lora_linears(model):
            linear.lora_B.copy_(0.2 * torch.randn(linear.lora_B.shape, generator=generator))


def run_layout(model_cfg, peft, name: str, work_dir: Path, world_size: int) -> dict:
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.parallel import process_groups

    tp, pp, cp, sp = LAYOUTS[name]
    dims = process_groups.ParallelDims(tp=tp, pp=pp, cp=cp, world_size=world_size)
    process_groups.init_distributed(dims, backend="cpu")
    process_groups.seed_everything(0)
    model = build(model_cfg, peft, tp, pp, cp, sp)
    if name == "tp1":
        randomize_b(model)
        dist_checkpoint.save_weights([model], work_dir / "initial_weights")
    dist_checkpoint.load_weights([model], work_dir / "initial_weights")
    if name == MUTANT:
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("lora_B"):
                    param.zero_()
    chunks = [training_step.wrap_ddp(model, use_distributed_optimizer=False, backend="cpu")]
    optimizer = FirstStepGradients(training_step.build_optimizer(
        chunks, training_step.OptimizerSettings(lr=1e-2)), chunks[0])
    run = train_and_save_gradients(chunks, optimizer, model_cfg, dims,
                                   work_dir / f"gradients_{name}")
    mcore.parallel_state.destroy_model_parallel()
    return run


def gradients_at_tp1(model_cfg, peft, work_dir: Path, world_size: int) -> dict[str, dict]:
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint
    from megatron_hybrid.model import adapters
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(world_size=world_size),
                                    backend="cpu")
    model = build(model_cfg, peft, 1, 1, 1, False)
    gradients = {}
    for name in LAYOUTS:
        dist_checkpoint.load_weights([model], work_dir / f"gradients_{name}")
        gradients[name] = {param_name: param.detach().clone()
                           for param_name, param in model.named_parameters()
                           if adapters.is_adapter_parameter(param_name)}
    mcore.parallel_state.destroy_model_parallel()
    return gradients


def main():
    backends.install("cpu")
    from megatron_hybrid.model.config import LORA_TARGETS, PeftConfig

    out_path, pattern = Path(sys.argv[1]), sys.argv[2]
    model_cfg = model_config(pattern)
    peft = PeftConfig(method="lora", rank=4, alpha=8.0, target_modules=list(LORA_TARGETS))
    world_size = int(os.environ["WORLD_SIZE"])
    work_dir = out_path.parent
    runs = {name: run_layout(model_cfg, peft, name, work_dir, world_size) for name in LAYOUTS}
    results = {"runs": runs,
               "gradients": gradients_at_tp1(model_cfg, peft, work_dir, world_size)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
