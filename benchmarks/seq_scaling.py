"""How training cost per token grows with sequence length: Mamba-only vs attention-only.

Two tiny models of the same width (hidden 128, no MLP layers) differ only in their mixers:
``MMMM`` (Mamba-2, chunked SSD scan) and ``****`` (attention, torch SDPA, causal). For each
sequence length, one sequence runs forward and backward through this project's cpu backend
(Megatron-Core's MambaModel); the benchmark records the time (best of a few runs) and the
peak CPU tensor memory (the allocator's count, ``plan.measure_cpu_peak``), both per token.
Expected: attention's time per token grows linearly with the length (its core is quadratic),
Mamba's stays flat; neither keeps ``s x s`` scores, so memory per token stays flat for both.

Writes ``seq_scaling_time.png`` and ``seq_scaling_memory.png`` to ``--out`` and the results
between the markers of ``docs/long_context.md``. About 3 minutes on 2 cores:

    python benchmarks/seq_scaling.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the memory probes' profiler, quiet
import torch  # noqa: E402

from megatron_hybrid import backends  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "long_context.md"
BEGIN, END = "<!-- seq_scaling:begin -->", "<!-- seq_scaling:end -->"
LENGTHS = (1024, 2048, 4096, 8192, 16384)
MODELS = {"Mamba-only (MMMM)": "MMMM", "attention-only (****)": "****"}


def model_config(pattern: str, seq_length: int):
    from megatron_hybrid.model.config import ModelConfig

    return ModelConfig(
        pattern=pattern, hidden_size=128, ffn_hidden_size=512, num_attention_heads=8,
        num_query_groups=2, kv_channels=16, mamba_num_heads=16, mamba_head_dim=16,
        mamba_state_dim=16, mamba_num_groups=2, vocab_size=1024, seq_length=seq_length,
        mamba_chunk_size=128)


def forward_backward(model, tokens: torch.Tensor) -> None:
    model(tokens, None, None, labels=tokens).sum().backward()
    model.zero_grad(set_to_none=True)


def measure(pattern: str, seq_length: int, repeats: int) -> tuple[float, float]:
    """(seconds, peak bytes) per token of one sequence's forward and backward."""
    from megatron_hybrid.model.build import ModelLayout, build_model
    from megatron_hybrid.parallel import process_groups
    from megatron_hybrid.planning import planner

    process_groups.seed_everything(0)
    model = build_model(model_config(pattern, seq_length), ModelLayout(), backend="cpu")
    tokens = torch.randint(0, 1024, (1, seq_length))
    _, peak = planner.measure_cpu_peak(lambda: forward_backward(model, tokens))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward(model, tokens)
        best = min(best, time.perf_counter() - start)
    return best / seq_length, peak / seq_length


def results_markdown(results: dict, command: str) -> str:
    from megatron_hybrid.engine import metrics

    names = list(MODELS)
    lines = [f"Measured {datetime.date.today().isoformat()} on {metrics.cpu_model_name()} "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}, Python "
             f"{platform.python_version()}; command: `{command}`.", "",
             "| tokens | " + " | ".join(f"{n}: us/token" for n in names) + " | "
             + " | ".join(f"{n}: KiB/token" for n in names) + " |",
             "|---:|" + "---:|" * (2 * len(names))]
    for length in LENGTHS:
        times = [f"{results[n][length][0] * 1e6:.0f}" for n in names]
        memory = [f"{results[n][length][1] / 1024:.1f}" for n in names]
        lines.append(f"| {length:,} | " + " | ".join(times + memory) + " |")
    first, last = LENGTHS[0], LENGTHS[-1]
    growth = {n: results[n][last][0] / results[n][first][0] for n in names}
    lines += ["", f"From {first:,} to {last:,} tokens ({last // first}x) the time per token grows "
              + ", ".join(f"{growth[n]:.1f}x for {n}" for n in names) + ".", "",
              "![time per token](seq_scaling_time.png)",
              "![memory per token](seq_scaling_memory.png)"]
    return "\n".join(lines)


def write_doc(markdown: str) -> None:
    text = DOC.read_text()
    block = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not block.search(text):
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block to fill in")
    DOC.write_text(block.sub(lambda _: f"{BEGIN}\n{markdown}\n{END}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point (best)")
    args = parser.parse_args()
    backends.install("cpu")
    from megatron_hybrid.engine import metrics
    from megatron_hybrid.parallel import process_groups

    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    try:
        results = {name: {} for name in MODELS}
        for length in LENGTHS:
            for name, pattern in MODELS.items():
                results[name][length] = measure(pattern, length, args.repeats)
                seconds, peak = results[name][length]
                print(f"{length:>6} {name:<24} {seconds * 1e6:8.0f} us/token "
                      f"{peak / 1024:8.1f} KiB/token", flush=True)
    finally:
        process_groups.destroy_distributed()
    for column, name, label in ((0, "time", "microseconds per token"),
                                (1, "memory", "peak KiB per token")):
        scale = 1e6 if column == 0 else 1 / 1024
        curves = {n: [(length, results[n][length][column] * scale) for length in LENGTHS]
                  for n in MODELS}
        metrics.plot_curves(curves, args.out / f"seq_scaling_{name}.png", xlabel="tokens",
                            ylabel=label, title=f"Forward + backward, {label} (CPU)")
    write_doc(results_markdown(results, " ".join(["python benchmarks/seq_scaling.py",
                                                  *sys.argv[1:]])))


if __name__ == "__main__":
    main()
