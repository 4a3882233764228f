"""Cached greedy generation on Megatron-Core 0.16.1's inference engines.

The prompt is run once; every later step feeds only the new token of each sequence, against
the attention layers' KV cache and the Mamba layers' conv and SSM states. Two engines:

- ``dynamic`` (``DynamicInferenceEngine``, the default): a paged KV cache and one Mamba state
  slot per request (``DynamicInferenceContext``); the prompts of a step are packed into one
  row, so prompts of different lengths are prefilled together, then decoded together.
- ``static`` (``StaticInferenceEngine``'s own loop, which Megatron-Core deprecates): one
  padded batch (``StaticInferenceContext``); it prefills up to the shortest prompt and then
  steps every sequence one token at a time, feeding a longer prompt's own tokens until it
  starts generating.

The dynamic engine also runs a model split by tensor and pipeline parallelism (every rank runs
the same requests; the pattern's uneven stages are honoured, see ``model/stack.HybridStack``;
TP ranks past the KV groups each cache their replica of one group's K/V);
context and sequence parallelism are training layouts, refused here. The static loop runs on
one rank. ``generate.generate_batch``, the uncached loop, is what both are tested against.
"""

from __future__ import annotations

import math
import warnings

from megatron_hybrid import mcore
from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.inference.generate import check_single_rank

ENGINES = ("dynamic", "static")

_BLOCK_TOKENS = 256
"""Tokens per KV-cache block: DynamicInferenceContext's default ``block_size_tokens``."""


class _TokenIds:
    """The tokenizer Megatron-Core's controller asks for, for callers that work in token ids:
    the static loop pads its batch with ``eod`` (padding is overwritten by generated tokens
    before it is fed), and both engines render each result as text, which stays empty here."""

    eod = 0

    def detokenize(self, tokens, **unused) -> str:
        return ""


def _wrapper_config(module, max_requests: int, max_sequence_length: int
                    ) -> "mcore.InferenceWrapperConfig":
    return mcore.InferenceWrapperConfig(
        hidden_size=module.config.hidden_size,
        params_dtype=module.config.params_dtype,
        # One forward over the whole step under pipeline parallelism too: no micro-batches.
        inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=module.vocab_size,
        inference_max_requests=max_requests,
        inference_max_seq_length=max_sequence_length,
    )


def _controller(module, config, context) -> "mcore.TextGenerationController":
    controller = mcore.TextGenerationController(
        mcore.GPTInferenceWrapper(module, config, context), _TokenIds())
    # Eval mode and a fresh context, as StaticInferenceEngine prepares its dynamic engine
    # (static_engine.py:105); the dynamic engine itself leaves the model's mode alone.
    controller.inference_wrapped_model.prep_model_for_inference()
    return controller


def greedy(max_new_tokens: int) -> "mcore.SamplingParams":
    """Sampling parameters for ``max_new_tokens`` argmax tokens, with no end-of-document stop:
    termination_id -1 never matches (the dynamic engine), and the static loop reads
    ``no_early_termination`` (text_generation_controller.py:1074), which is no field."""
    sampling = mcore.SamplingParams(top_k=1, num_tokens_to_generate=max_new_tokens,
                                    termination_id=-1)
    sampling.add_attributes({"no_early_termination": True})
    return sampling


def cache_gigabytes(module, max_requests: int, max_sequence_length: int) -> float:
    """The dynamic context's memory on this rank for ``max_requests`` requests of
    ``max_sequence_length`` tokens: their KV blocks, each with one request's Mamba states, as
    ``DynamicInferenceContext`` divides its buffer (dynamic_context.py:407-444), plus its
    dummy block and one to spare for rounding. It derives its request slots from the block
    count, rounded down to a multiple of 4, so there are at least that many blocks."""
    config = module.config
    layers = module.decoder.layer_type_list
    itemsize = config.params_dtype.itemsize
    # Without Mamba layers the context keeps a KV cache for every layer, MLPs included
    # (dynamic_context.py:383-387).
    cached_layers = layers.count("*") if "M" in layers else len(layers)
    kv_heads = _kv_heads(config) // config.tensor_model_parallel_size
    kv_block = 2 * cached_layers * _BLOCK_TOKENS * kv_heads * config.kv_channels * itemsize
    mamba = mcore.get_mamba_inference_state_config_from_model(module)
    mamba_request = 0 if mamba is None else (
        layers.count("M") * itemsize
        * (math.prod(mamba.mamba_conv_states_shape) + math.prod(mamba.mamba_ssm_states_shape)))
    rounder = mcore.DynamicInferenceContext.REQUEST_ROUNDER
    blocks = max(max_requests * -(-max_sequence_length // _BLOCK_TOKENS),
                 rounder * -(-max_requests // rounder)) + 2
    return blocks * (kv_block + mamba_request) / 1024**3


def _kv_heads(config) -> int:
    """K/V heads the context caches over the tensor-parallel ranks, each rank its share: the
    KV groups, or one per rank where ranks outnumber them (each holds a replica of one
    group's K/V, transformer/attention.py:289-293)."""
    return max(config.num_query_groups, config.tensor_model_parallel_size)


def check_decode_layout(model) -> None:
    """Refuse context and sequence parallelism at decode, and layers with their own cache
    shapes, in one line."""
    config = unwrap(model).config
    if config.context_parallel_size != 1:
        raise ConfigError(f"context parallel (cp={config.context_parallel_size}) splits a "
                          f"sequence over ranks for training; decode with cp=1 (tp and pp work)")
    if config.sequence_parallel:
        raise ConfigError("sequence parallel is a training layout; decode without it (tp and "
                          "pp work)")
    cached = ("num_query_groups", "mamba_num_heads")  # one cache shape per kind
    for layer in unwrap(model).decoder.layers:
        differing = [name for name in cached
                     if getattr(layer.config, name) != getattr(config, name)]
        if differing:
            raise ConfigError(f"layer {layer.layer_number - 1} has its own {differing[0]} "
                              f"(model.layer_overrides): Megatron-Core's dynamic engine caches "
                              f"one shape per layer kind; use per-layer FFN widths only")


def dynamic_engine(model, *, max_requests: int, max_sequence_length: int
                   ) -> "mcore.DynamicInferenceEngine":
    """Megatron-Core's dynamic engine over this rank's part of ``model`` (put in eval mode),
    with room for ``max_requests`` requests of up to ``max_sequence_length`` tokens each."""
    check_decode_layout(model)
    module = unwrap(model)
    config = _wrapper_config(module, max_requests, max_sequence_length)
    context = _context(module, config)
    return mcore.DynamicInferenceEngine(_controller(module, config, context), context,
                                        random_seed=0)  # greedy sampling never draws


def _context(module, config) -> "mcore.DynamicInferenceContext":
    """The dynamic context ``DynamicInferenceContext.from_config`` builds
    (dynamic_context.py:779-832), but with ``max_requests`` request slots: from_config drops its
    ``max_batch_size`` and sizes the slots from the cache (about one per block), and every
    decode step then runs all of them, a Mamba layer updating each padded row's state."""
    model_config = module.config
    max_requests = mcore.DynamicInferenceContext.round_up_requests(
        config.inference_max_requests, model_config.tensor_model_parallel_size)
    return mcore.DynamicInferenceContext(
        params_dtype=config.params_dtype,
        num_layers=model_config.num_layers // model_config.pipeline_model_parallel_size,
        kv_channels=model_config.kv_channels,
        num_attention_heads=_kv_heads(model_config),
        tensor_model_parallel_size=model_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=model_config.pipeline_model_parallel_size,
        max_sequence_length=config.inference_max_seq_length,
        buffer_size_gb=cache_gigabytes(module, max_requests, config.inference_max_seq_length),
        max_requests=max_requests,
        materialize_only_last_token_logits=False,
        mamba_inference_state_config=mcore.get_mamba_inference_state_config_from_model(module),
    )


def _run_dynamic(model, prompts, max_new_tokens) -> list[list[int]]:
    engine = dynamic_engine(model, max_requests=len(prompts),
                            max_sequence_length=max(map(len, prompts)) + max_new_tokens)
    records = engine.generate([list(prompt) for prompt in prompts], greedy(max_new_tokens))
    return [list(record.merge().generated_tokens) for record in records]


def _run_static(model, prompts, max_new_tokens) -> list[list[int]]:
    module = unwrap(model)
    config = _wrapper_config(module, len(prompts), max(map(len, prompts)) + max_new_tokens)
    controller = _controller(module, config, mcore.StaticInferenceContext.from_config(config))
    with warnings.catch_warnings():
        # Megatron-Core announces the deprecation of the static loop, chosen here on purpose.
        warnings.filterwarnings("ignore", message="The static engine will be deprecated")
        engine = mcore.StaticInferenceEngine(controller, max_batch_size=len(prompts),
                                             legacy=True)
    requests = [mcore.InferenceRequest(request_id=index, prompt="", prompt_tokens=prompt,
                                       sampling_params=greedy(max_new_tokens))
                for index, prompt in enumerate(prompts)]
    return [request.generated_tokens.tolist()
            for request in engine.generate(inference_requests=requests)]


def generate_cached(model, prompts: list[list[int]], max_new_tokens: int, *,
                    engine: str = "dynamic") -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), ``max_new_tokens`` ids each, as
    ``generate.generate_batch`` gives it without a stop, computed with cached states on
    Megatron-Core's ``engine`` (one of :data:`ENGINES`; the static one on one rank only). The
    model's mode is kept."""
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}: choose one of "
                         f"{', '.join(ENGINES)}")
    if engine == "static":
        check_single_rank(model)
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    module = unwrap(model)
    was_training = module.training
    run = _run_dynamic if engine == "dynamic" else _run_static
    try:
        return run(model, prompts, max_new_tokens)
    finally:
        module.train(was_training)
