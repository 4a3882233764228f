"""Pure-PyTorch CPU versions of the two ``flash_attn`` (2.7) functions Megatron-Core 0.16.1's
dynamic inference calls, on its paged KV cache.

``transformer/attention.py`` binds them at import (line 94), asks for flash-attn >= 2.7.3
in dynamic batching (line 926), and calls them in ``flash_decode_and_prefill``:
``flash_attn_varlen_func`` for steps with prefill (line 814) and ``flash_attn_with_kvcache``
for decode-only steps (line 872). Each sequence's keys and
values live in blocks of the cache (``(blocks, block_size, kv_heads, dim)``), listed in order
by its row of ``block_table``. Causal masks are bottom-right aligned, as flash-attn's are: the
queries are a sequence's last positions. Rows without keys (padding) give zeros. Forward only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cached(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """(length, kv_heads, dim): one sequence's keys or values, read from its blocks in order."""
    used = blocks[: -(-length // cache.shape[1])].long()
    return cache[used].flatten(0, 1)[:length]


def _attend(q, k, v, softmax_scale):
    """q (q_len, heads, dim) at the last q_len positions of k, v (k_len, kv_heads, dim).

    Batched 4-D, and without a mask where none is needed (a whole prompt: causal; one query:
    every key), so SDPA takes its fused CPU kernel; a mask or 3-D inputs send it to the math
    path, which holds a q_len x k_len score matrix (1.2 GB at 4k tokens)."""
    q_len, k_len = q.shape[0], k.shape[0]
    mask = None
    if q_len not in (1, k_len):
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if q.shape[1] != k.shape[1]:  # grouped queries: each key head serves a group of them
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask,
                                         is_causal=q_len == k_len > 1, scale=softmax_scale)
    return out[0].transpose(0, 1)


def _check_supported(causal: bool, block_table) -> None:
    if not causal or block_table is None:
        raise NotImplementedError("the cpu backend's flash_attn covers causal attention on a "
                                  "paged KV cache (block_table) only")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, block_table=None,
                           **unused):
    """Packed queries q (tokens, heads, dim), sequence i's at cu_seqlens_q[i]:[i+1], against
    cache blocks k, v; sequence i has cu_seqlens_k[i+1] - cu_seqlens_k[i] keys."""
    _check_supported(causal, block_table)
    out = torch.zeros_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for row in range(len(starts_q) - 1):
        first, end = starts_q[row], starts_q[row + 1]
        length = starts_k[row + 1] - starts_k[row]
        if end > first and length > 0:
            out[first:end] = _attend(q[first:end], _cached(k, block_table[row], length),
                                     _cached(v, block_table[row], length), softmax_scale)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, softmax_scale=None,
                            causal=False, block_table=None, **unused):
    """Queries q (batch, q_len, heads, dim) against each row's cache_seqlens[row] cached keys
    (the new ones already appended)."""
    _check_supported(causal, block_table)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for row, length in enumerate(cache_seqlens.tolist()):
        if length > 0:
            out[row] = _attend(q[row], _cached(k_cache, block_table[row], length),
                               _cached(v_cache, block_table[row], length), scale)
    return out
