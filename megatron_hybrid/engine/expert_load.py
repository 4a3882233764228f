"""Each routed expert's share of the tokens, per MoE layer, while a model trains.

Forward hooks on the routers add up the routing map (tokens x experts, one mark per choice)
of every training forward; at each log step the counts are summed over all ranks (so over
data, context, sequence and expert parallel ranks and the pipeline stages, each stage filling
its own layers' rows), and the logging rank writes them to ``expert_load.jsonl`` and puts the
interval's load-balance statistics in the metrics record. After training, ``plot`` draws the
whole run's shares as a heat map (``expert_load.png``) beside the imbalance per log step, and
``write_report`` writes ``expert_load_report.md``.

Counts are routing choices, so tensor-parallel ranks without sequence parallelism (which
route the same tokens) and recomputed forwards count a token more than once; every figure
here is a share, where such a factor cancels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid import backends
from megatron_hybrid.model.config import ModelConfig

HISTORY = "expert_load.jsonl"
HEAT_MAP = "expert_load.png"
REPORT = "expert_load_report.md"
_ROUTER_NAME = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.mlp\.router$")
"""A router of the trained model (wrappers add ``module.``), not of a distillation teacher."""


class ExpertLoadMeter:
    """Counts routing choices per (MoE layer, expert) on this rank; ``interval`` turns them
    into the log step's statistics (a collective: every rank calls it at the same steps)."""

    def __init__(self, model_chunks: list, cfg: ModelConfig, *, pp: int, pp_rank: int,
                 run_dir: str | Path, is_logging_rank: bool):
        from megatron_hybrid import mcore

        layers = cfg.layer_pattern.layers
        self.moe_layers = [index for index, symbol in enumerate(layers) if symbol == "E"]
        self.counts = torch.zeros(len(self.moe_layers), cfg.num_moe_experts,
                                  dtype=torch.float64, device=backends.device())
        self.history = Path(run_dir) / HISTORY if is_logging_rank else None
        offset = cfg.layer_pattern.stage_offsets(pp)[pp_rank]
        self._hooks = []
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                found = _ROUTER_NAME.match(name)
                if found and isinstance(module, mcore.TopKRouter):
                    row = self.moe_layers.index(offset + int(found.group(1)))
                    self._hooks.append(module.register_forward_hook(self._counter(row)))

    def _counter(self, row: int):
        def count(module, inputs, output) -> None:
            if module.training:  # evaluation forwards do not train the router
                _, routing_map = output
                self.counts[row] += routing_map.sum(dim=0).to(self.counts.dtype)
        return count

    def interval(self, step: int) -> dict:
        """The interval's statistics (empty off the logging rank), its counts appended to the
        history; the counts start again."""
        dist.all_reduce(self.counts)
        counts, self.counts = self.counts.cpu(), torch.zeros_like(self.counts)
        if self.history is None:
            return {}
        with open(self.history, "a") as history:
            history.write(json.dumps({"step": step, "layers": self.moe_layers,
                                      "tokens": counts.tolist()}) + "\n")
        return balance_statistics(counts)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def balance_statistics(counts: torch.Tensor) -> dict:
    """Load balance of ``counts`` [layers, experts]: the busiest expert's load over the mean
    (1.0 is perfect balance; the number of experts means one expert took every token), the
    least busy's, and the coefficient of variation, each averaged over the layers."""
    load = counts / counts.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return {"expert_load_max_over_mean": float(load.max(dim=1).values.mean()),
            "expert_load_min_over_mean": float(load.min(dim=1).values.mean()),
            "expert_load_cv": float(load.std(dim=1, unbiased=False).mean())}


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's ``expert_load.jsonl`` records, a step logged twice (a resumed run appends)
    kept from its latest record."""
    path = Path(run_dir) / HISTORY
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {record["step"]: record for record in records}
    return [latest[step] for step in sorted(latest)]


def run_shares(records: list[dict]) -> torch.Tensor:
    """Each expert's share of its layer's routing choices over the records [layers, experts]."""
    total = sum(torch.tensor(record["tokens"], dtype=torch.float64) for record in records)
    return total / total.sum(dim=1, keepdim=True).clamp_min(1e-12)


def plot(run_dir: str | Path, title: str) -> Path:
    """``expert_load.png``: the run's shares per layer and expert (heat map), and the busiest
    expert's load over the mean per log step."""
    from matplotlib.figure import Figure

    from megatron_hybrid.engine.metrics import DPI, FIGSIZE

    records = read_history(run_dir)
    shares = run_shares(records)
    layers, experts = shares.shape
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    heat, trend = fig.subplots(1, 2, width_ratios=[3, 2])
    image = heat.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                        interpolation="nearest")
    heat.set_title("share of each layer's routed tokens")
    heat.set_xlabel("expert")
    heat.set_ylabel("layer")
    heat.set_yticks(range(layers), [str(index) for index in records[-1]["layers"]])
    if experts <= 32:
        heat.set_xticks(range(experts))
    fig.colorbar(image, ax=heat, label=f"share (balanced: 1/{experts} = {1 / experts:.3f})")
    steps = [record["step"] for record in records]
    imbalance = [balance_statistics(torch.tensor(record["tokens"], dtype=torch.float64))
                 for record in records]
    trend.plot(steps, [s["expert_load_max_over_mean"] for s in imbalance], marker="o")
    trend.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    trend.set_title("busiest expert / mean")
    trend.set_xlabel("step")
    trend.grid(alpha=0.3)
    fig.suptitle(f"{title}: expert load")
    out = Path(run_dir) / HEAT_MAP
    fig.savefig(out, dpi=DPI)
    return out


def write_report(run_dir: str | Path, title: str) -> Path:
    """``expert_load_report.md``: the heat map and each layer's balance over the run."""
    records = read_history(run_dir)
    shares = run_shares(records)
    experts = shares.shape[1]
    lines = [f"# {title}: expert load", "",
             f"Routing choices over steps {records[0]['step']}-{records[-1]['step']}, summed "
             f"over all ranks; a balanced layer gives each of its {experts} experts "
             f"{1 / experts:.3f}.", "", f"![expert load]({HEAT_MAP})", "",
             "| layer | busiest expert | its share | least busy | its share | max / mean |",
             "|---|---|---|---|---|---|"]
    for layer, row in zip(records[-1]["layers"], shares):
        top, low = int(row.argmax()), int(row.argmin())
        lines.append(f"| {layer} | {top} | {row[top]:.3f} | {low} | {row[low]:.3f} | "
                     f"{row[top] * experts:.2f} |")
    out = Path(run_dir) / REPORT
    out.write_text("\n".join(lines) + "\n")
    return out
