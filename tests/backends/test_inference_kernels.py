"""The cpu backend's stand-ins for Megatron-Core's dynamic inference: paged attention (the
flash_attn functions), the Triton tensor ops of the Mamba mixer, and padding requests' state
slot -1 in the Mamba decode kernels, each against a plain computation."""

import torch

from megatron_hybrid.backends.kernels import paged_attention, tensor_ops
from megatron_hybrid.backends.kernels.conv1d import causal_conv1d_update
from megatron_hybrid.backends.kernels.ssd import selective_state_update

F64 = dict(rtol=1e-10, atol=1e-10)


def dense_causal_attention(q, k, v, scale):
    """q (q_len, heads, dim) at the last positions of k, v (k_len, kv_heads, dim)."""
    q_len, k_len = q.shape[0], k.shape[0]
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    future = torch.arange(k_len)[None, :] > torch.arange(k_len - q_len, k_len)[:, None]
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def paged(keys: list[torch.Tensor], block_size: int, blocks: int, seed: int):
    """Each sequence's keys written into shuffled blocks of one cache: (cache, block_table)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks, generator=g)
    cache = torch.randn(blocks, block_size, *keys[0].shape[1:], generator=g, dtype=torch.float64)
    per_row = max(-(-len(k) // block_size) for k in keys)
    table = torch.full((len(keys), per_row), -1, dtype=torch.int32)
    taken = 0
    for row, sequence in enumerate(keys):
        count = -(-len(sequence) // block_size)
        table[row, :count] = order[taken:taken + count]
        taken += count
        for index in range(count):
            chunk = sequence[index * block_size:(index + 1) * block_size]
            cache[table[row, index], :len(chunk)] = chunk
    return cache, table


def test_paged_prefill_and_decode_equal_dense_attention():
    g = torch.Generator().manual_seed(0)
    k_lens, q_lens = [7, 3, 12], [7, 1, 5]  # whole prompt, one new token, a chunk after a cache
    keys = [torch.randn(n, 2, 4, generator=g, dtype=torch.float64) for n in k_lens]
    values = [torch.randn(n, 2, 4, generator=g, dtype=torch.float64) for n in k_lens]
    k_cache, table = paged(keys, block_size=4, blocks=12, seed=1)
    v_cache, _ = paged(values, block_size=4, blocks=12, seed=1)
    queries = [torch.randn(n, 4, 4, generator=g, dtype=torch.float64) for n in q_lens]
    expected = [dense_causal_attention(q, k, v, 0.3) for q, k, v in zip(queries, keys, values)]
    cu_q = torch.tensor([0, 7, 8, 13], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 22], dtype=torch.int32)
    out = paged_attention.flash_attn_varlen_func(torch.cat(queries), k_cache, v_cache, cu_q, cu_k,
                                                 7, 12, softmax_scale=0.3, causal=True,
                                                 block_table=table)
    torch.testing.assert_close(out, torch.cat(expected), **F64)

    decode_q = torch.stack([q[-1:] for q in queries])  # (batch, 1, heads, dim)
    lengths = torch.tensor(k_lens + [0], dtype=torch.int32)  # a padding row without keys
    decoded = paged_attention.flash_attn_with_kvcache(
        torch.cat([decode_q, decode_q[:1]]), k_cache, v_cache, cache_seqlens=lengths,
        softmax_scale=0.3, causal=True, block_table=torch.cat([table, table[:1]]))
    torch.testing.assert_close(decoded[:3, 0], torch.stack([e[-1] for e in expected]), **F64)
    assert decoded[3].abs().sum() == 0


def test_tensor_ops_follow_megatron_cores_triton_kernels():
    rows = torch.arange(12.0).reshape(6, 2)
    out = torch.full((4, 2), -1.0)
    tensor_ops.tensor_get_slice_after(rows, out, torch.tensor([3]))
    torch.testing.assert_close(out, torch.cat([rows[3:], torch.full((1, 2), -1.0)]))

    a, b = torch.zeros(5, 2), torch.ones(3, 2)
    merged = torch.full((6, 2), 7.0)
    tensor_ops.tensor_merge(a, b, torch.tensor([2]), output_tensor=merged)
    torch.testing.assert_close(merged, torch.tensor([[0.0] * 2] * 2 + [[1.0] * 2] * 3
                                                    + [[7.0] * 2]))
    tensor_ops.tensor_merge(a, b, torch.tensor([4]))  # in place: as many rows of b as fit
    torch.testing.assert_close(a, torch.tensor([[0.0] * 2] * 4 + [[1.0] * 2]))

    states = torch.zeros(4, 2, 3)
    tensor_ops.tensor_masked_update(states, torch.tensor([2, -1, 0]), torch.ones(3, 2, 3) *
                                    torch.tensor([1.0, 2.0, 3.0])[:, None, None])
    torch.testing.assert_close(states[:, 0, 0], torch.tensor([3.0, 0.0, 1.0, 0.0]))


def test_padding_requests_state_slot_is_neither_read_into_nor_written():
    """Megatron-Core's dynamic context gives a step's padding requests state slot -1
    (``mamba_metadata.py:157``): the real requests' results and slots are as without it."""
    g = torch.Generator().manual_seed(2)
    conv_cache = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, generator=g, dtype=torch.float64), None
    x = torch.randn(2, 6, generator=g, dtype=torch.float64)
    alone = conv_cache.clone()
    expected = causal_conv1d_update(x[:1], alone, weight, bias, "silu",
                                    conv_state_indices=torch.tensor([1]))
    out = causal_conv1d_update(x, conv_cache, weight, bias, "silu",
                               conv_state_indices=torch.tensor([1, -1]))
    torch.testing.assert_close(out[:1], expected, **F64)
    torch.testing.assert_close(conv_cache, alone, **F64)

    ssm_cache = torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64)
    xs, dt = (torch.randn(2, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(2, 3, 4, generator=g, dtype=torch.float64)
    B, C = (torch.randn(2, 1, 4, generator=g, dtype=torch.float64) for _ in range(2))
    alone = ssm_cache.clone()
    expected = selective_state_update(alone, xs[:1], dt[:1], A, B[:1], C[:1], dt_softplus=True,
                                      state_batch_indices=torch.tensor([2]))
    out = selective_state_update(ssm_cache, xs, dt, A, B, C, dt_softplus=True,
                                 state_batch_indices=torch.tensor([2, -1]))
    torch.testing.assert_close(out[:1], expected, **F64)
    torch.testing.assert_close(ssm_cache, alone, **F64)


def test_varlen_scan_ignores_whatever_fills_the_padding_tokens():
    # Megatron-Core's mixed decode + prefill step scans a buffer whose tail it never writes
    # (torch.empty_like): NaN there must not reach the sequences' outputs or states.
    from megatron_hybrid.backends.kernels.ssd import mamba_chunk_scan_combined

    torch.manual_seed(0)
    length, padded, heads, head_dim, groups, state = 13, 20, 2, 4, 1, 8
    x = torch.randn(1, padded, heads, head_dim)
    dt = torch.rand(1, padded, heads)
    B, C = torch.randn(1, padded, groups, state), torch.randn(1, padded, groups, state)
    cu_seqlens = torch.tensor([0, 6, length])
    seq_idx = torch.tensor([[0] * 6 + [1] * (padded - 6)], dtype=torch.int32)
    A = -torch.rand(heads)

    def scan(fill):
        tensors = [t.clone() for t in (x, dt, B, C)]
        for t in tensors:
            t[:, length:] = fill
        out, states = mamba_chunk_scan_combined(*tensors[:2], A, *tensors[2:], chunk_size=8,
                                                seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                                return_varlen_states=True)
        return out[:, :length], states

    clean_out, clean_states = scan(0.0)
    out, states = scan(float("nan"))
    assert torch.isfinite(out).all() and torch.isfinite(states).all()
    torch.testing.assert_close(out, clean_out)
    torch.testing.assert_close(states, clean_states)
