"""Time per token of one Mamba layer and one attention layer against sequence length (CPU).

    python benchmarks/mamba_layer_scaling.py                       # 1k .. 16k tokens
    python benchmarks/mamba_layer_scaling.py --lengths 1024 4096 --out scaling.png --json

Both layers are the real Megatron-Core layers of the cpu backend (``MambaLayer`` with the
torch SSD kernels, ``TransformerLayer`` with SDPA attention) at the widths of
``megatron-hybrid bench``'s default model, timed forward + backward on one sequence (batch 1,
fp32). Lengths are interleaved round by round so that machine load drifts hit all of them
alike; each point is the median over the rounds. The chunked SSD scan is linear in the
sequence length, so the Mamba layer's time per token should stay flat, while causal
attention's grows with the length. The report gives the Mamba spread, max / min time per
token over the lengths, against the 15% the project promises.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

FLATNESS_TARGET = 1.15
"""Largest over smallest Mamba-layer time per token across the lengths."""
KINDS = {"mamba": 0, "attention": 1}
"""Layer kind -> its index in the two-layer model ``M*`` built here."""


def build_layers(max_length: int):
    """The Mamba and attention layers of the bench's default model, in training mode."""
    from megatron_hybrid import backends

    backends.install("cpu")
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups
    from megatron_hybrid.planning import bench

    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    process_groups.seed_everything(1234)
    cfg = bench.DEFAULT_MODEL.replace(pattern="M*", seq_length=max_length)
    model = build_model(cfg, ModelLayout(), backend="cpu").train()
    return {kind: model.decoder.layers[index] for kind, index in KINDS.items()}, cfg.hidden_size


def time_layer(layer, length: int, hidden_size: int) -> float:
    """Seconds of one forward + backward of ``layer`` on a (length, 1, hidden) input."""
    import torch

    hidden = torch.randn(length, 1, hidden_size, requires_grad=True)
    start = time.perf_counter()
    out = layer(hidden, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def measure(lengths: list[int], rounds: int, progress) -> dict:
    """{kind: {length: median seconds per token}} over ``rounds`` interleaved rounds (plus
    one untimed warm-up round)."""
    layers, hidden_size = build_layers(max(lengths))
    seconds = {kind: {length: [] for length in lengths} for kind in KINDS}
    for round_index in range(rounds + 1):
        for length in lengths:
            for kind, layer in layers.items():
                elapsed = time_layer(layer, length, hidden_size)
                if round_index:
                    seconds[kind][length].append(elapsed / length)
        if progress is not None:
            print(f"  round {round_index}/{rounds}" + (" (warm-up)" if not round_index else ""),
                  file=progress, flush=True)
    return {kind: {length: statistics.median(times) for length, times in by_length.items()}
            for kind, by_length in seconds.items()}


def summarise(per_token: dict) -> dict:
    mamba = per_token["mamba"].values()
    spread = max(mamba) / min(mamba)
    return {"seconds_per_token": per_token, "mamba_spread": spread,
            "flatness_target": FLATNESS_TARGET, "mamba_is_flat": spread <= FLATNESS_TARGET}


def plot(per_token: dict, out_png: Path) -> Path:
    from megatron_hybrid.engine.metrics import plot_curves

    curves = {f"{kind} layer": [(length, 1e6 * value) for length, value in by_length.items()]
              for kind, by_length in per_token.items()}
    return plot_curves(curves, out_png, title="Forward + backward time per token (CPU, fp32)",
                       xlabel="sequence length (tokens)", ylabel="microseconds per token")


def format_report(result: dict) -> str:
    per_token = result["seconds_per_token"]
    lines = [f"  {'tokens':>8}" + "".join(f"{kind + ' us/token':>20}" for kind in per_token)]
    for length in per_token["mamba"]:
        lines.append(f"  {length:>8}" + "".join(f"{1e6 * per_token[kind][length]:>20.1f}"
                                                for kind in per_token))
    verdict = "flat" if result["mamba_is_flat"] else "not flat"
    lines.append(f"  Mamba layer spread (max / min time per token): {result['mamba_spread']:.3f} "
                 f"(target <= {result['flatness_target']}: {verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all lengths")
    parser.add_argument("--out", type=Path, default=Path("mamba_layer_scaling.png"),
                        help="the PNG of both curves")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    per_token = measure(sorted(args.lengths), args.rounds, None if args.json else sys.stderr)
    result = summarise(per_token)
    result["png"] = str(plot(per_token, args.out))
    print(json.dumps(result, indent=2) if args.json else format_report(result)
          + f"\n  plot: {result['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
