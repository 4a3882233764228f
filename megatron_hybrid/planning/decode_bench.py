"""``megatron-hybrid bench decode``: per-token decode latency against a cached context.

Three measurements, ours and HF's each in a spawned process with the training bench's process
settings (:mod:`planning.bench`: threads, denormals flushed, freed memory kept in the heap;
read back from each live process):

- **latency by context**: the hybrid and an all-attention twin of (nearly) the same parameter
  count (:func:`attention_twin`) each get ``batch`` prompts of ``context`` tokens on
  Megatron-Core's dynamic engine (``inference.engine.dynamic_engine``). Once every
  context's engines are prefilled, rounds of decode steps go over all of them: the contexts
  in turn, the two models alternating (hybrid, attention, attention, hybrid, ...), the order
  reversed every round, so drift in the machine's load reaches all alike. Each model's median
  step time at a context is its per-token latency there (a step gives every sequence of the
  batch one token); its growth with the context is summed up as a least-squares slope, ms
  per token per 1k tokens of context;
- **cached against uncached**: greedy generation of ``new_tokens`` from ``batch`` prompts of
  ``prompt`` tokens on the hybrid, with the cached engine (``generate_cached``) and with the
  uncached loop (``generate.generate_batch``, a full forward per new token);
- **ours against HF**: the same generation by HF ``NemotronHForCausalLM.generate`` with its
  cache, on the same model converted to HF's names, in a process that never installs the cpu
  backend (so transformers runs its torch path).

The generation runs alternate in rounds (the order reversed every round) after an untimed
warm-up; medians over the rounds. The cached tokens must equal the uncached ones; HF's are
compared and reported. The speed targets are reported as met or not, never asserted.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.planning import bench

DEFAULT_MODEL = bench.DEFAULT_MODEL.replace(seq_length=33792)
"""The training bench's 22.7M hybrid, with room for a 32k context and the new tokens after it."""
DEFAULT_CONTEXTS = (128, 512, 2048, 4096, 8192, 16384)
"""Up to 8k: the cpu backend's prefill attention holds each head's full score matrix (see
docs/inference.md), about 20 GB for a 16k prompt."""
WARMUP_TOKENS = 2
"""Tokens of the untimed generation round: enough to run prefill and decode once."""
MODELS = ("hybrid", "attention")
PATHS = ("cached", "uncached", "hf")
LABELS = {"cached": "ours cached (Megatron-Core dynamic engine)",
          "uncached": "ours uncached (a full forward per token)",
          "hf": "HF NemotronH generate, cached (torch path)"}
EQUAL_SETTINGS = ("threads", *bench.PROCESS_SETTINGS)
"""Settings both processes must share for a fair ratio; ``kernels`` (the code path) differs."""
TWIN_TOLERANCE = 5e-3
"""Largest relative difference of the twin's parameter count from the hybrid's."""
TARGET_CACHED_SPEEDUP, TARGET_PROMPT, TARGET_NEW_TOKENS = 20.0, 512, 32
"""Uncached over cached generation time, at a 512-token prompt and 32 new tokens."""
TARGET_HF_RATIO = 1.5
"""HF's cached generation time over ours."""
TARGET_LATENCY_FRACTION, TARGET_CONTEXT = 1 / 3, 16384
"""The hybrid's per-token latency over the twin's, at a 16k context."""


@dataclass(frozen=True, kw_only=True)
class DecodeSettings:
    model: ModelConfig
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    """Cached tokens before the timed decode steps."""
    batch: int = 2
    """Sequences decoded together."""
    new_tokens: int = 32
    """Timed decode steps at each context, and the tokens each generation run produces."""
    prompt: int = 512
    """Prompt length of the generation runs (cached, uncached, HF)."""
    repeats: int = 3
    """Timed rounds of the generation runs."""
    threads: int = 0
    """torch intra-op threads in each process (0: torch's default)."""
    seed: int = 1234

    def validate(self) -> None:
        """One-line errors naming the option to change."""
        self.model.validate()
        for option, value in (("--batch", self.batch), ("--new-tokens", self.new_tokens),
                              ("--repeats", self.repeats)):
            if value < 1:
                raise ValueError(f"{option} {value}: give {option} 1 or more")
        if self.threads < 0:
            raise ValueError(f"--threads {self.threads}: give 0 (torch's default) or more")
        if len(set(self.contexts)) < 2:
            raise ValueError("--contexts needs at least two lengths for the slope, e.g. "
                             "--contexts 128,2k")
        room = self.model.seq_length - self.new_tokens
        for option, noun, length in [*(("--contexts", "context", n) for n in self.contexts),
                                     ("--prompt", "prompt", self.prompt)]:
            if length < 1:
                raise ValueError(f"{option}: a {noun} of {length} tokens; give 1 or more")
            if length > room:
                raise ValueError(
                    f"{option}: a {noun} of {length} tokens + {self.new_tokens} new ones "
                    f"exceeds the model's sequence length {self.model.seq_length}: give "
                    f"--seq-length {length + self.new_tokens} or a shorter {noun}")


def attention_twin(cfg: ModelConfig) -> ModelConfig:
    """The all-attention model ``*-*-...`` with as many attention layers as ``cfg`` has
    sequence mixers (Mamba and attention), each followed by an MLP, whose MLP width is
    chosen so that its parameter count is closest to ``cfg``'s (the count is linear in it)."""
    from megatron_hybrid.model.params import count_parameters

    mixers = sum(symbol in "M*" for symbol in cfg.layer_pattern.layers)
    twin = cfg.replace(pattern="*-" * mixers)
    target = count_parameters(cfg)["total"]
    base = count_parameters(twin)["total"]
    per_unit = count_parameters(twin.replace(ffn_hidden_size=twin.ffn_hidden_size + 1)
                                )["total"] - base
    width = twin.ffn_hidden_size + round((target - base) / per_unit)
    if width < 1:
        raise ValueError(f"pattern {cfg.pattern!r}: an all-attention twin with {mixers} MLPs "
                         "has more parameters than the hybrid at any MLP width")
    return twin.replace(ffn_hidden_size=width)


# The parent: start both processes, run the measurements, summarise.

def benchmark(settings: DecodeSettings, progress=None) -> dict:
    """Run the benchmark and return its results (see :func:`format_report` for the fields);
    a progress bar and one line per measurement go to ``progress`` when given."""
    import torch
    from tqdm import tqdm

    settings = dataclasses.replace(settings, threads=settings.threads or torch.get_num_threads())
    steps = (2 + len(PATHS) * (settings.repeats + 1) + len(settings.contexts)
             + settings.new_tokens)
    with (tqdm(total=steps, file=progress, disable=progress is None, unit="run",
               leave=False) as bar, tempfile.TemporaryDirectory(prefix="megatron-hybrid-") as tmp):
        weights = Path(tmp) / "hf_weights.pt"
        bar.set_description("building the models")
        with bench.WorkerProcess("ours", OursDecoding, settings, weights) as ours:
            bar.update()
            with bench.WorkerProcess("hf", HFDecoding, settings, weights) as hf:
                bar.update()
                generation = _compare_generation({"ours": ours, "hf": hf}, settings, bar)
                reports = {"hf": hf.call("report")}
                hf_parameters = hf.started["parameters"]
            contexts = _measure_contexts(ours, settings, bar)
            reports["ours"] = ours.call("report")
            started = ours.started
    started["parameters"]["hf"] = hf_parameters
    return summarise(settings, started, contexts, generation, reports)


def _compare_generation(processes: dict, settings: DecodeSettings, bar) -> dict:
    """Per path (:data:`PATHS`), each timed round's tokens and seconds; round 0 is the
    untimed warm-up, of :data:`WARMUP_TOKENS` tokens."""
    prompts = token_prompts(settings, settings.prompt)
    runs = {path: {"tokens": [], "seconds": []} for path in PATHS}
    for round_index in range(settings.repeats + 1):
        for path in PATHS if round_index % 2 == 0 else PATHS[::-1]:
            kind = "warm-up" if round_index == 0 else f"round {round_index}/{settings.repeats}"
            bar.set_description(f"generation {kind}: {path}")
            new_tokens = settings.new_tokens if round_index else WARMUP_TOKENS
            side = processes["hf" if path == "hf" else "ours"]
            tokens, seconds = side.call("generate", path, prompts, new_tokens)
            if round_index > 0:
                runs[path]["tokens"].append(tokens)
                runs[path]["seconds"].append(seconds)
            bar.update()
    _say(bar, "  generation of {} tokens from {} prompts of {}: ".format(
        settings.new_tokens, settings.batch, settings.prompt) + ", ".join(
        f"{path} {statistics.median(runs[path]['seconds']):.2f} s" for path in PATHS))
    return runs


def _measure_contexts(ours, settings: DecodeSettings, bar) -> dict:
    """Per context: each model's decode-step seconds, prefill seconds and decode rows. Every
    context's engines are prefilled first and then decoded together in rounds, so a change in
    the machine's load reaches every context and model alike."""
    prefill = {}
    for context in settings.contexts:
        bar.set_description(f"prefill of {settings.batch} x {context} tokens")
        prefill[context] = ours.call("prefill", context)
        bar.update()
        _say(bar, f"  prefill of {settings.batch} x {context} tokens: " + ", ".join(
            f"{name} {prefill[context][name]:.1f} s" for name in MODELS))
    seconds = {context: {name: [] for name in MODELS} for context in settings.contexts}
    for index in range(settings.new_tokens):
        bar.set_description(f"decode round {index + 1}/{settings.new_tokens}")
        for name, by_context in ours.call("decode_round", index).items():
            for context, step_seconds in by_context.items():
                seconds[context][name].append(step_seconds)
        bar.update()
    rows = ours.call("finish_decode")
    return {context: {"seconds": seconds[context], "prefill_seconds": prefill[context],
                      "decode_rows": {name: rows[name][context] for name in MODELS}}
            for context in settings.contexts}


def _say(bar, line: str) -> None:
    """A progress line above the bar, on its stream (none when it is off)."""
    if not bar.disable:
        bar.write(line, file=bar.fp)


def token_prompts(settings: DecodeSettings, length: int) -> list[list[int]]:
    """``settings.batch`` random prompts of ``length`` tokens, the same in every process."""
    import torch

    generator = torch.Generator().manual_seed(settings.seed + length)
    return torch.randint(0, settings.model.vocab_size, (settings.batch, length),
                         generator=generator).tolist()


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
            / sum((x - mean_x) ** 2 for x in xs))


def summarise(settings: DecodeSettings, started: dict, contexts: dict, generation: dict,
              reports: dict) -> dict:
    """The results as a JSON-ready dict: per context the median ms per decode step of each
    model, the slopes, the generation medians and ratios, the settings and the targets."""
    rows = [{"context": n, **{f"{name}_ms": statistics.median(run["seconds"][name]) * 1e3
                              for name in MODELS},
             "step_ms": {name: [s * 1e3 for s in run["seconds"][name]] for name in MODELS},
             "prefill_s": run["prefill_seconds"], "decode_rows": run["decode_rows"]}
            for n, run in sorted(contexts.items())]
    slopes = {name: least_squares_slope([row["context"] / 1000 for row in rows],
                                        [row[f"{name}_ms"] for row in rows]) for name in MODELS}
    medians = {path: statistics.median(generation[path]["seconds"]) for path in PATHS}
    speedup, hf_ratio = medians["uncached"] / medians["cached"], medians["hf"] / medians["cached"]
    at_target = {row["context"]: row["hybrid_ms"] / row["attention_ms"] for row in rows}.get(
        TARGET_CONTEXT)
    at_target_settings = (settings.prompt, settings.new_tokens) == (TARGET_PROMPT,
                                                                   TARGET_NEW_TOKENS)
    hf_sequences_equal = sum(hf == ours for hf_round, ours_round in zip(
        generation["hf"]["tokens"], generation["cached"]["tokens"])
        for hf, ours in zip(hf_round, ours_round))
    return {
        "contexts": rows, "slopes_ms_per_1k": slopes,
        "models": started["models"], "parameters": started["parameters"],
        "twin_parameter_difference": (started["parameters"]["attention"]
                                      / started["parameters"]["hybrid"] - 1),
        "batch": settings.batch, "new_tokens": settings.new_tokens, "prompt": settings.prompt,
        "repeats": settings.repeats, "threads": settings.threads,
        "generation": {path: {"seconds_median": medians[path],
                              "seconds": generation[path]["seconds"]} for path in PATHS},
        "cached_speedup": speedup, "hf_ratio": hf_ratio,
        "cached_equals_uncached": generation["cached"]["tokens"]
        == generation["uncached"]["tokens"],
        "hf_sequences_equal": hf_sequences_equal,
        "hf_sequences": settings.batch * settings.repeats,
        "settings": reports,
        "settings_unequal": bench.settings_unequal(reports["ours"], reports["hf"],
                                                   EQUAL_SETTINGS),
        "device": started["device"],
        "targets": {"cached_speedup": TARGET_CACHED_SPEEDUP, "hf_ratio": TARGET_HF_RATIO,
                    "latency_fraction": TARGET_LATENCY_FRACTION,
                    "latency_fraction_context": TARGET_CONTEXT},
        "latency_fraction": at_target,
        "meets_targets": {
            "cached_speedup": speedup >= TARGET_CACHED_SPEEDUP if at_target_settings else None,
            "hf_ratio": hf_ratio >= TARGET_HF_RATIO,
            "latency_fraction": (None if at_target is None
                                 else at_target <= TARGET_LATENCY_FRACTION)},
    }


def format_report(result: dict) -> str:
    hybrid, twin = result["models"]["hybrid"], result["models"]["attention"]
    parameters = result["parameters"]
    lines = [
        f"bench decode: hybrid {hybrid['pattern']} ({parameters['hybrid'] / 1e6:.2f}M "
        f"parameters) vs all-attention twin {twin['pattern']} (MLP {twin['ffn_hidden_size']}, "
        f"{parameters['attention'] / 1e6:.2f}M, {result['twin_parameter_difference']:+.3%}), "
        f"batch {result['batch']}, fp32, {result['device']}",
        f"  per-token latency: ms per decode step (one new token for each of the "
        f"{result['batch']} sequences), median of {result['new_tokens']} steps, the models "
        "alternating; rows computed: the decode batch as the engine pads it (hybrid/attention)",
        f"  {'context':>9}{'hybrid ms':>12}{'attention ms':>14}{'hybrid/attention':>18}"
        f"{'rows computed':>15}",
    ]
    for row in result["contexts"]:
        rows = "/".join(str(row["decode_rows"][name]) for name in MODELS)
        lines.append(f"  {row['context']:>9}{row['hybrid_ms']:>12.1f}{row['attention_ms']:>14.1f}"
                     f"{row['hybrid_ms'] / row['attention_ms']:>18.2f}{rows:>15}")
    slopes = result["slopes_ms_per_1k"]
    lines += [
        f"  slope (least squares): hybrid {slopes['hybrid']:.3f}, attention "
        f"{slopes['attention']:.3f} ms per token per 1k tokens of context",
        f"  generation of {result['new_tokens']} tokens from {result['batch']} prompts of "
        f"{result['prompt']} tokens (hybrid), median of {result['repeats']} rounds, "
        "alternating:",
    ]
    lines += [f"    {LABELS[path]:<46}{result['generation'][path]['seconds_median']:>8.2f} s"
              for path in PATHS]
    verdict = {True: "met", False: "not met"}
    meets, fraction = result["meets_targets"], result["latency_fraction"]
    unequal = result["settings_unequal"]
    lines += [
        f"  tokens: cached {'=' if result['cached_equals_uncached'] else '!='} uncached; HF = "
        f"ours cached for {result['hf_sequences_equal']} of {result['hf_sequences']} sequences",
        "  settings: " + (f"UNEQUAL ({', '.join(unequal)})" if unequal else "equal in both "
                          "processes (" + ", ".join(f"{key} {result['settings']['ours'][key]}"
                                                    for key in EQUAL_SETTINGS) + ")"),
        "  targets:",
        f"    cached >= {TARGET_CACHED_SPEEDUP:.0f}x faster than uncached (prompt "
        f"{TARGET_PROMPT}, {TARGET_NEW_TOKENS} new tokens): {result['cached_speedup']:.1f}x, "
        + (verdict[meets["cached_speedup"]] if meets["cached_speedup"] is not None else
           f"not judged (measured at prompt {result['prompt']}, {result['new_tokens']} new "
           "tokens)"),
        f"    ours >= {TARGET_HF_RATIO}x HF's cached generate: {result['hf_ratio']:.2f}x, "
        f"{verdict[meets['hf_ratio']]}",
        f"    hybrid <= 1/3 of the twin's per-token latency at {TARGET_CONTEXT}: " + (
            f"{fraction:.2f}, {verdict[meets['latency_fraction']]}" if fraction is not None
            else f"not measured (add {TARGET_CONTEXT} to --contexts)"),
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """The per-token latency curves of both models against the context, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [row["context"] for row in result["contexts"]]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name in MODELS:
        model = result["models"][name]
        axes.plot(contexts, [row[f"{name}_ms"] for row in result["contexts"]], marker="o",
                  label=f"{name} {model['pattern']} ({result['parameters'][name] / 1e6:.1f}M): "
                        f"{result['slopes_ms_per_1k'][name]:.2f} ms per 1k")
    axes.set_xscale("log", base=2)
    axes.set_xticks(contexts, [f"{n // 1024}k" if n >= 1024 else str(n) for n in contexts])
    axes.set(xlabel="cached context (tokens)", ylabel="ms per decode step", ylim=(0, None),
             title=f"Decode latency, batch {result['batch']}, fp32, {result['threads']} threads")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# The two processes.

class OursDecoding:
    """Our side, in its worker process: the hybrid and its all-attention twin on the cpu
    backend; writes the hybrid's weights in HF's names to ``weights`` for the HF side."""

    def __init__(self, settings: DecodeSettings, weights: Path):
        import torch

        torch.set_num_threads(settings.threads)
        from megatron_hybrid import backends

        backends.install("cpu")
        from megatron_hybrid.engine import metrics
        from megatron_hybrid.model.build import ModelLayout, build_model
        from megatron_hybrid.parallel import process_groups

        process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
        configs = {"hybrid": settings.model, "attention": attention_twin(settings.model)}
        self.models = {}
        for name, cfg in configs.items():
            process_groups.seed_everything(settings.seed)
            self.models[name] = build_model(cfg, ModelLayout(), backend="cpu").eval()
        bench.save_hf_weights(self.models["hybrid"], settings.model, weights)
        self.settings = settings
        self.engines = {name: {} for name in MODELS}
        # Untimed: the first prefill and decode steps compile Megatron-Core's fused functions.
        self.prefill(min(settings.contexts))
        self.decode_round(0)
        self.finish_decode()
        self.started = {"models": {name: cfg.to_dict() for name, cfg in configs.items()},
                        "parameters": {name: sum(p.numel() for p in model.parameters())
                                       for name, model in self.models.items()},
                        "device": metrics.cpu_device_name()}

    def generate(self, path: str, prompts: list[list[int]], new_tokens: int
                 ) -> tuple[list[list[int]], float]:
        """The hybrid's greedy tokens, cached or uncached (``path``), and the seconds taken."""
        from megatron_hybrid.inference.engine import generate_cached
        from megatron_hybrid.inference.generate import generate_batch

        run = generate_cached if path == "cached" else generate_batch
        start = time.perf_counter()
        tokens = run(self.models["hybrid"], prompts, new_tokens)
        return tokens, time.perf_counter() - start

    def prefill(self, context: int) -> dict:
        """Both models' engines holding ``batch`` prompts of ``context`` tokens, kept for the
        decode rounds; each model's prefill seconds."""
        seconds = {}
        for name in MODELS:
            self.engines[name][context], seconds[name] = self._prefilled(name, context)
        return seconds

    def decode_round(self, index: int) -> dict:
        """One decode step of every engine, timed: the contexts in turn (reversed every other
        round), the two models alternating; per model, per context, the step's seconds."""
        contexts = sorted(self.engines["hybrid"], reverse=index % 2 == 1)
        seconds = {name: {} for name in MODELS}
        for position, context in enumerate(contexts):
            for name in MODELS if (index + position) % 2 == 0 else MODELS[::-1]:
                start = time.perf_counter()
                self.engines[name][context].step_modern()
                seconds[name][context] = time.perf_counter() - start
        return seconds

    def finish_decode(self) -> dict:
        """Per model, per context, the rows its decode steps computed (the engine pads the
        batch); the engines are dropped."""
        rows = {name: {context: engine.context.padded_active_token_count
                       for context, engine in engines.items()}
                for name, engines in self.engines.items()}
        self.engines = {name: {} for name in MODELS}
        return rows

    def _prefilled(self, name: str, context: int):
        """An engine over model ``name`` holding ``batch`` requests of ``context`` prompt
        tokens, stepped until each has its first token, and the seconds that took. A request
        prefilled early decodes while later ones prefill (``max_tokens`` a step): it may
        generate that many more tokens, so none finishes while the timed steps run."""
        from megatron_hybrid import mcore
        from megatron_hybrid.inference.engine import dynamic_engine, greedy

        batch, chunk = self.settings.batch, mcore.DynamicInferenceContext.DEFAULT_MAX_TOKENS
        prefill_steps = batch + -(-batch * context // chunk)
        budget = self.settings.new_tokens + prefill_steps
        engine = dynamic_engine(self.models[name], max_requests=batch,
                                max_sequence_length=context + budget)
        for request_id, prompt in enumerate(token_prompts(self.settings, context)):
            engine.add_request(request_id, prompt, greedy(budget))
        start = time.perf_counter()
        for _ in range(prefill_steps):
            engine.step_modern()
            if all(engine.get_request(index).generated_tokens for index in range(batch)):
                return engine, time.perf_counter() - start
        raise RuntimeError(f"the {name} model's engine did not prefill {batch} prompts of "
                           f"{context} tokens in {prefill_steps} steps")

    def report(self) -> dict:
        return bench.process_settings_report(bench.ours_kernels())


class HFDecoding:
    """HF ``NemotronHForCausalLM`` on its torch reference path, from the weights
    :class:`OursDecoding` wrote, in a process with the cpu backend's process settings."""

    def __init__(self, settings: DecodeSettings, weights: Path):
        import torch

        torch.set_num_threads(settings.threads)
        bench.require_hf_torch_path()
        bench.apply_process_settings(())
        self.model = bench.hf_model(settings.model, weights).eval()
        # Ours decodes with no end-of-document stop (termination id -1); so does HF then.
        self.model.generation_config.eos_token_id = None
        self.started = {"parameters": sum(p.numel() for p in self.model.parameters())}

    def generate(self, path: str, prompts: list[list[int]], new_tokens: int
                 ) -> tuple[list[list[int]], float]:
        """HF's greedy cached tokens (``path`` "hf") and the seconds taken."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            ids = torch.tensor(prompts)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=new_tokens, do_sample=False,
                                      use_cache=True)
        seconds = time.perf_counter() - start
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, not "
                               f"{new_tokens}: it stopped early")
        return out[:, ids.shape[1]:].tolist(), seconds

    def report(self) -> dict:
        return bench.process_settings_report(bench.hf_kernels(self.model))
