"""Context parallel (CP) pieces the cpu backend adds: batch sharding and attention over CP.

Megatron-Core shards a sequence load-balanced for causal work: split it into ``2 * cp``
chunks; CP rank r holds chunks r and ``2*cp - 1 - r`` (as
``megatron.core.utils.get_batch_on_this_cp_rank``). Its Mamba layers expect that layout
(their all-to-all regathers the sequence by it). Attention needs every earlier key, so
:func:`attention` all-gathers K and V over the CP group (backward: reduce-scatter of their
gradients) and masks by the global positions of the chunks. On GPUs Transformer Engine's
attention does CP instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid import mcore


class ContextParallelError(ValueError):
    """Context parallel cannot split this model or sequence; the message says what to change."""


def load_balanced_positions(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions of CP rank ``cp_rank``'s tokens in a ``seq_length`` sequence.

    E.g. seq 8, cp 2: rank 0 holds [0, 1, 6, 7], rank 1 holds [2, 3, 4, 5].
    """
    if seq_length % (2 * cp_size):
        raise ContextParallelError(
            f"sequence length {seq_length} is not divisible by 2 * cp = {2 * cp_size}: "
            f"choose a sequence length that is a multiple of {2 * cp_size}")
    chunks = torch.arange(seq_length).view(2 * cp_size, -1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])


def batch_on_this_rank(batch: dict) -> dict:
    """This CP rank's share of a micro-batch whose values are all ``[batch, seq]`` tensors
    (tokens, labels, loss_mask, position_ids); the batch itself at CP=1."""
    state = mcore.parallel_state
    cp_size = state.get_context_parallel_world_size()
    if cp_size == 1:
        return batch
    seq_length = next(iter(batch.values())).shape[1]
    positions = load_balanced_positions(seq_length, cp_size, state.get_context_parallel_rank())
    return {key: value.index_select(1, positions.to(value.device))
            for key, value in batch.items()}


def check_matches_groups(config_cp_size: int, group_cp_size: int) -> None:
    """Refuse a TransformerConfig whose CP size is not the process groups': the model would
    build, Mamba layers would still do CP, attention would not, and the loss would be wrong."""
    if config_cp_size != group_cp_size:
        raise ContextParallelError(
            f"TransformerConfig.context_parallel_size={config_cp_size} but the process groups "
            f"have cp={group_cp_size}: build the model with ModelLayout(cp={group_cp_size})")


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, group,
              scale: float, dropout_p: float) -> torch.Tensor:
    """Causal attention of this CP rank's queries over the whole sequence's keys.

    ``query`` ``[s, b, heads, d]`` and ``key``/``value`` ``[s, b, groups, d]`` hold this
    rank's two chunks (``s`` tokens); returns ``[b, heads, s, d]``.
    """
    cp_size, cp_rank = group.size(), group.rank()
    local = query.shape[0]
    # Gathered along the sequence in rank order; the backward reduce-scatters their grads.
    key, value = (mcore.tensor_parallel.gather_from_sequence_parallel_region(t, group=group)
                  for t in (key, value))
    full = local * cp_size
    query_positions = load_balanced_positions(full, cp_size, cp_rank)
    key_positions = torch.cat([load_balanced_positions(full, cp_size, rank)
                               for rank in range(cp_size)])
    causal = (key_positions[None, :] <= query_positions[:, None]).to(query.device)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale,
                                          dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1])
