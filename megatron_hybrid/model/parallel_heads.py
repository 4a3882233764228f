"""Hymba's parallel heads (Dong et al., arXiv 2411.13676): the pattern's ``H`` layer, whose
attention heads and Mamba-2 heads read the same normed input side by side, and its meta tokens.

One ``H`` layer computes, as Hymba's hybrid-head block does,

    x + W_out((beta1 * norm(attn(x')) + beta2 * norm(ssm(x'))) / 2),   x' = norm(x)

from Megatron-Core parts: its ``SelfAttention`` (column-parallel QKV, SDPA core) and its
``MambaMixer`` (column-parallel in_proj, the gated scan without the mixer's group norm, so
the branch output is ``y * silu(z)`` as in Hymba), each built with its output projection left
out (:class:`Unprojected`); the two branch outputs, of the same width (attention heads x head
dim = Mamba heads x head dim), are each RMS-normed over their whole width with per-channel
scales beta (:class:`ShardedRMSNorm`), averaged and projected once by a row-parallel W_out.
The FFN that follows each Hymba block is a separate ``-`` layer of the pattern.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed._functional_collectives as funcol

from megatron_hybrid import mcore
from megatron_hybrid.errors import ConfigError

CACHED_DECODE_REFUSED = (
    "cached generation does not support parallel-heads ('H') layers or meta tokens "
    "(model.num_meta_tokens): Megatron-Core's KV and Mamba state caches hold one kind of "
    "state per layer and no prefix; generate from a model without them")


class Unprojected(torch.nn.Module):
    """Takes the place of a branch's output projection: its input passes unchanged (with no
    bias), so the layer projects the fused branches once. Accepts a linear's arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, inputs: torch.Tensor):
        return inputs, None


class ShardedRMSNorm(torch.nn.Module):
    """RMSNorm, with per-channel scales, over a width whose channels are split across the
    tensor-parallel ranks: each rank's sum of squares is all-reduced (and so is its gradient),
    so every rank divides by the RMS of the whole width, as at TP=1."""

    def __init__(self, config: "mcore.TransformerConfig", width: int, tp_group):
        super().__init__()
        self.width, self.eps, self.tp_group = width, config.layernorm_epsilon, tp_group
        self.weight = torch.nn.Parameter(
            torch.ones(width // tp_group.size(), dtype=config.params_dtype))
        mcore.tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        squares = hidden_states.float().square().sum(dim=-1, keepdim=True)
        if self.tp_group.size() > 1:
            squares = funcol.all_reduce(squares, "sum", self.tp_group)  # and its gradient
        normed = hidden_states.float() * torch.rsqrt(squares / self.width + self.eps)
        return normed.to(hidden_states.dtype) * self.weight

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return mcore.make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


@dataclasses.dataclass
class ParallelHeadsSubmodules:
    """The specs :class:`ParallelHeadsLayer` builds its parts from."""

    norm: "mcore.ModuleSpec | type"
    """The pre-norm both branches read through."""
    self_attention: "mcore.ModuleSpec"
    """Megatron-Core's SelfAttention with an :class:`Unprojected` ``linear_proj``."""
    mixer: "mcore.ModuleSpec"
    """A Mamba mixer with an :class:`Unprojected` ``out_proj`` and ``rmsnorm=False``."""
    out_proj: "mcore.ModuleSpec | type"
    """The one row-parallel projection of the fused branches."""


class ParallelHeadsLayer(mcore.MegatronModule):
    """The pattern's ``H`` layer (see the module docstring); ``[s, b, h]`` in and out."""

    def __init__(self, config: "mcore.TransformerConfig", submodules: ParallelHeadsSubmodules,
                 layer_number: int = 1, pg_collection=None, pp_layer_offset: int = 0,
                 residual_in_fp32: bool = False):
        # residual_in_fp32: MambaStack passes it to every Mamba slot; False in this project.
        super().__init__(config)
        self.layer_number = layer_number
        width = config.num_attention_heads * config.kv_channels
        self.norm = mcore.build_module(submodules.norm, config, config.hidden_size,
                                       eps=config.layernorm_epsilon)
        self.self_attention = mcore.build_module(submodules.self_attention, config=config,
                                                 layer_number=layer_number,
                                                 pg_collection=pg_collection)
        self.mixer = mcore.build_module(submodules.mixer, config, d_model=config.hidden_size,
                                        layer_number=layer_number, pg_collection=pg_collection,
                                        pp_layer_offset=pp_layer_offset)
        self.attention_norm = ShardedRMSNorm(config, width, pg_collection.tp)
        self.ssm_norm = ShardedRMSNorm(config, width, pg_collection.tp)
        self.out_proj = mcore.build_module(
            submodules.out_proj, width, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=False, is_expert=False, tp_group=pg_collection.tp)

    def mamba_state_shapes_per_request(self):
        """The mixer's: Megatron-Core's inference context sizes its Mamba states by asking
        the first layer in a Mamba slot, before :meth:`forward` refuses cached decode."""
        return self.mixer.mamba_state_shapes_per_request()

    def forward(self, hidden_states, attention_mask=None, inference_context=None,
                rotary_pos_emb=None, *, packed_seq_params=None, **unused):
        if inference_context is not None:
            raise ConfigError(CACHED_DECODE_REFUSED)
        normed = self.norm(hidden_states)
        attention, _ = self.self_attention(normed, attention_mask,
                                           packed_seq_params=packed_seq_params)
        ssm, _ = self.mixer(normed, packed_seq_params=packed_seq_params)
        fused = (self.attention_norm(attention) + self.ssm_norm(ssm)) / 2
        output, _ = self.out_proj(fused)
        return hidden_states + output


class MetaTokens(torch.nn.Module):
    """Hymba's meta tokens: ``count`` learnable vectors put before every sequence."""

    def __init__(self, config: "mcore.TransformerConfig", count: int):
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(count, config.hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            # From the default generator, which is the same on every tensor-parallel rank
            # (as Megatron-Core's replicated MoE router weight is initialised).
            config.init_method(self.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h]`` -> ``[count + s, b, h]``."""
        meta = self.weight.to(hidden_states.dtype).unsqueeze(1)
        return torch.cat([meta.expand(-1, hidden_states.shape[1], -1), hidden_states])


def check_meta_token_layout(config: "mcore.TransformerConfig") -> None:
    """Meta tokens lengthen every sequence, which pipeline stages' transfers, context-parallel
    chunks and sequence-parallel shards are sized without: refuse those layouts."""
    for key, size in (("parallel.pp", config.pipeline_model_parallel_size),
                      ("parallel.cp", config.context_parallel_size)):
        if size > 1:
            raise ConfigError(f"model.num_meta_tokens needs {key}=1 (got {size}): meta tokens "
                              f"lengthen every sequence; set {key}=1 or model.num_meta_tokens=0")
    if config.sequence_parallel:
        raise ConfigError("model.num_meta_tokens needs parallel.sequence_parallel=false: meta "
                          "tokens lengthen every sequence; turn it off or set "
                          "model.num_meta_tokens=0")
