"""Pure-PyTorch CPU versions of mamba_ssm's Mamba-2 (SSD) kernels.

They mirror the signatures and return conventions of mamba_ssm 2.2
(``ops.triton.ssd_combined.mamba_chunk_scan_combined`` / ``mamba_split_conv1d_scan_combined``
and ``ops.triton.selective_state_update.selective_state_update``) as Megatron-Core 0.16.1's
``MambaMixer`` calls them, and are differentiable through autograd.

The scan is the chunked SSD algorithm of Mamba-2's ``ssd_minimal_discrete``: an attention-like
quadratic form inside each chunk, plus the recurrence over chunk states written as a
(chunks x chunks) decay matrix, so no Python loop runs over tokens or chunks.

Packed documents (``seq_idx``) follow the Triton kernels: ids are compared for equality, so each
document's tokens must be contiguous (Megatron-Core numbers them 0, 1, 2, ...), and
``initial_states`` continue the document with id 0, the id assumed before the first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.backends.kernels._util import compute_dtype, read_rows, write_rows
from megatron_hybrid.backends.kernels.conv1d import causal_conv1d_fn
from megatron_hybrid.backends.kernels.norm_gated import rmsnorm_fn


def _discretize_dt(dt, dt_bias, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt  # threshold 20, as in the kernels


def _gate(y, z):
    return y if z is None else y * F.silu(z.to(y.dtype))


def _segsum(a, keep=None):
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] where j <= i (and keep), else -inf.

    Summing the masked terms rather than differencing a cumsum keeps long spans exact
    (Mamba-2's stable segsum); exp(-inf) = 0 cuts both decay and gradient.
    """
    size = a.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=a.device)
    sums = a[..., None].expand(*a.shape, size).masked_fill(~ones.tril(-1), 0).cumsum(-2)
    allowed = ones.tril() if keep is None else ones.tril() & keep
    return sums.masked_fill(~allowed, float("-inf"))


def _masked_exp(log_decay, keep):
    return torch.exp(log_decay if keep is None else log_decay.masked_fill(~keep, float("-inf")))


def _document_masks(seq_idx, nchunks, chunk_size):
    """Where decay may flow, for packed documents (all None without seq_idx).

    same_doc (b, c, 1, i, j): tokens i and j of a chunk; prev_doc (b, c, 1, i): token i and the
    end of the previous chunk (document 0 before the first); same_end (b, 1, c+1, c+1): the ends
    of two chunks (index 0: before the first).
    """
    if seq_idx is None:
        return None, None, None
    pad = nchunks * chunk_size - seq_idx.shape[1]
    seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)  # padding continues
    seq = seq.reshape(seq.shape[0], nchunks, chunk_size)
    ends = F.pad(seq[..., -1], (1, 0))
    same_doc = (seq[..., :, None] == seq[..., None, :])[:, :, None]
    prev_doc = (seq == ends[:, :-1, None])[:, :, None]
    same_end = (ends[:, :, None] == ends[:, None, :])[:, None]
    return same_doc, prev_doc, same_end


def _ssd(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx, state_positions):
    """Chunked scan with discretized ``dt``.

    Returns y (b, l, h, p) including the D skip (no gate), the final states (b, h, p, n) and the
    states after the tokens at ``state_positions`` of batch row 0 (k, h, p, n), or None.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    dtype = dt.dtype
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen

    def chunked(t):  # (b, l, ...) -> (b, c, chunk, ...); padded tokens have dt = 0: no effect
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    def by_group(t, dim):  # split a heads dim into (groups, heads per group)
        return t.unflatten(dim, (ngroups, nheads // ngroups))

    xdt = by_group(chunked(x.to(dtype) * dt[..., None]), 3)  # (b, c, i, g, r, p)
    B, C = chunked(B.to(dtype)), chunked(C.to(dtype))  # (b, c, i, g, n)
    log_a = chunked(dt * A.to(dtype)).transpose(2, 3)  # (b, c, h, i)
    cumsum = log_a.cumsum(-1)

    same_doc, prev_doc, same_end = _document_masks(seq_idx, nchunks, chunk_size)

    # Within chunks: y_i += sum_{j <= i} C_i.B_j decay(j -> i) dt_j x_j
    decay = torch.exp(_segsum(log_a, same_doc))  # (b, c, h, i, j)
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B)[:, :, :, None] * by_group(decay, 2)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, xdt)

    # Each chunk's own contribution to the state at its end (the last row of decay).
    to_end = by_group(decay[..., -1, :].transpose(2, 3), 3)[..., None]  # (b, c, j, g, r, 1)
    chunk_states = torch.einsum("bcjgn,bcjgrp->bcgrpn", B, xdt * to_end).flatten(2, 3)

    # Across chunks: states[c] = state before chunk c; states[nchunks] = final state.
    if initial_states is None:
        initial_states = chunk_states.new_zeros(batch, nheads, headdim, dstate)
    states = torch.cat([initial_states.to(dtype)[:, None], chunk_states], dim=1)
    chunk_log_a = F.pad(cumsum[..., -1].transpose(1, 2), (1, 0))  # (b, h, c+1)
    chunk_decay = torch.exp(_segsum(chunk_log_a, same_end))
    states = torch.einsum("bhcs,bshpn->bchpn", chunk_decay, states)

    from_start = _masked_exp(cumsum, prev_doc)  # decay from each chunk's start to token i
    starts = by_group(states[:, :-1], 2)
    y_carry = torch.einsum("bcign,bcgrpn->bcigrp", C, starts)
    y = y + y_carry * by_group(from_start.transpose(2, 3), 3)[..., None]
    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + x.to(dtype) * (D[:, None] if D.dim() == 1 else D).to(dtype)

    picked = None
    if state_positions is not None:  # the chunk's own part up to the token, plus the carry-in
        chunk, row = state_positions.long() // chunk_size, state_positions.long() % chunk_size
        to_row = by_group(decay[0][chunk, :, row].transpose(1, 2), 2)[..., None]  # (k, j, g, r, 1)
        own = torch.einsum("kjgn,kjgrp->kgrpn", B[0, chunk], xdt[0, chunk] * to_row)
        carried = from_start[0][chunk, :, row][..., None, None] * states[0, chunk]
        picked = own.flatten(1, 2) + carried
    return y, states[:, -1], picked


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    return_varlen_states=False,
):
    """Mamba-2 selective scan.

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p); z: (b, l, h, p)
    gates ``y * silu(z)``; dt_bias: (h,); initial_states: (b, h, p, n); seq_idx: (b, l);
    cu_seqlens: (num_sequences + 1,), only used with return_varlen_states (batch 1), giving the
    state after each sequence (pass the matching seq_idx so sequences do not leak into each
    other). Returns out, (out, final_states), (out, varlen_states) or
    (out, final_states, varlen_states).
    """
    if return_varlen_states:
        assert cu_seqlens is not None, "cu_seqlens must be provided if return_varlen_states is True"
        assert x.shape[0] == 1, "varlen states are only supported if batch dimension is 1"
    dt = _discretize_dt(dt, dt_bias, dt_softplus, compute_dtype(x)).clamp(*dt_limit)
    last_tokens = cu_seqlens[1:] - 1 if return_varlen_states else None
    y, final_states, varlen_states = _ssd(
        x, dt, A, B, C, chunk_size, D, initial_states, seq_idx, last_tokens
    )
    out = _gate(y, z).to(x.dtype)
    if not return_varlen_states:
        return (out, final_states) if return_final_states else out
    return (out, final_states, varlen_states) if return_final_states else (out, varlen_states)


def mamba_split_conv1d_scan_combined(
    zxbcdt,
    conv1d_weight,
    conv1d_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    initial_states=None,
    seq_idx=None,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    activation="silu",
    rmsnorm_weight=None,
    rmsnorm_eps=1e-6,
    outproj_weight=None,
    outproj_bias=None,
    headdim=None,
    ngroups=1,
    norm_before_gate=True,
):
    """Mamba-2 mixer from the in-projection onwards.

    zxbcdt: (b, l, 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads), split into a
    SwiGLU branch (d_nonssm, may be 0), z, xBC and dt; xBC goes through the causal conv
    (conv1d_weight (dim + 2 * ngroups * dstate, width)) and activation, then the scan with
    softplus(dt + dt_bias). The output is gated by silu(z), or normed by a gated RMSNorm over
    ngroups groups when rmsnorm_weight is given, then optionally projected by outproj_weight.
    headdim is required when D is (nheads,). Returns out (b, l, d), or (out, final_states).
    """
    assert activation in (None, "silu", "swish")
    if D.dim() == 1:
        assert headdim is not None
        (nheads,) = D.shape
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    assert d_nonssm >= 0
    assert zxbcdt.shape[-1] == 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads
    zx0, z, xBC, dt = torch.split(
        zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1
    )
    xBC = causal_conv1d_fn(
        xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, final_states = mamba_chunk_scan_combined(
        x.unflatten(-1, (nheads, headdim)),
        dt,
        A,
        B.unflatten(-1, (ngroups, dstate)),
        C.unflatten(-1, (ngroups, dstate)),
        chunk_size,
        D=D,
        z=z.unflatten(-1, (nheads, headdim)) if rmsnorm_weight is None else None,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=True,
    )
    out = y.flatten(-2)
    if rmsnorm_weight is not None:
        out = rmsnorm_fn(
            out,
            rmsnorm_weight,
            None,
            z=z,
            eps=rmsnorm_eps,
            group_size=dim // ngroups,
            norm_before_gate=norm_before_gate,
        )
    if d_nonssm > 0:
        gate, value = zx0.chunk(2, dim=-1)
        out = torch.cat([F.silu(gate) * value, out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    else:
        assert outproj_bias is None
    return (out, final_states) if return_final_states else out


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    """One decode step; updates ``state`` in place.

    With heads: state (cache, h, p, n), x/dt/z (b, h, p), A (h, p, n), B/C (b, g, n),
    D/dt_bias (h, p). Without: state (cache, dim, n), x/dt/z (b, dim), A (dim, n), B/C (b, n),
    D/dt_bias (dim,). cache == b unless state_batch_indices (b,) picks the rows to use.
    Returns out shaped like x.
    """
    if state.dim() == 3:  # no head dim: one head

        def one_head(t, dim):
            return None if t is None else t.unsqueeze(dim)

        return selective_state_update(
            state.unsqueeze(1),
            x.unsqueeze(1),
            dt.unsqueeze(1),
            A.unsqueeze(0),
            B.unsqueeze(1),
            C.unsqueeze(1),
            one_head(D, 0),
            one_head(z, 1),
            one_head(dt_bias, 0),
            dt_softplus,
            state_batch_indices,
        ).squeeze(1)
    dtype = compute_dtype(x)
    heads_per_group = x.shape[1] // B.shape[1]
    B = B.to(dtype).repeat_interleave(heads_per_group, dim=1)[:, :, None, :]  # (b, h, 1, n)
    C = C.to(dtype).repeat_interleave(heads_per_group, dim=1)
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dtype)[..., None]
    x32 = x.to(dtype)
    rows = read_rows(state, state_batch_indices).to(dtype)
    rows = rows * torch.exp(dt * A.to(dtype)) + dt * x32[..., None] * B
    write_rows(state, state_batch_indices, rows)
    out = torch.einsum("bhpn,bhn->bhp", rows, C)
    if D is not None:
        out = out + x32 * D.to(dtype)
    return _gate(out, z).to(x.dtype)
