"""Pure-PyTorch CPU versions of mamba_ssm's Mamba-2 (SSD) kernels.

They mirror the signatures and return conventions of mamba_ssm 2.2
(``ops.triton.ssd_combined.mamba_chunk_scan_combined`` / ``mamba_split_conv1d_scan_combined``
and ``ops.triton.selective_state_update.selective_state_update``) as Megatron-Core 0.16.1's
``MambaMixer`` calls them, and are differentiable through autograd.

The scan is the chunked SSD algorithm of Mamba-2's ``ssd_minimal_discrete``: an attention-like
quadratic form inside each chunk, plus the recurrence over chunk states as a scan, one
multiply-add of the (heads x head dim x state) states per chunk. Time is linear in the length:
the minimal version's (chunks x chunks) decay matrix would grow quadratically with it (128
chunks at 16k tokens). No Python loop runs over tokens.

Packed documents (``seq_idx``) follow the Triton kernels: ids are compared for equality, so each
document's tokens must be contiguous (Megatron-Core numbers them 0, 1, 2, ...), and
``initial_states`` continue the document with id 0, the id assumed before the first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.backends.kernels._util import compute_dtype, read_rows, write_rows
from megatron_hybrid.backends.kernels.conv1d import causal_conv_tokens
from megatron_hybrid.backends.kernels.norm_gated import rmsnorm_fn


def _discretize_dt(dt, dt_bias, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt  # threshold 20, as in the kernels


def _gate(y, z):
    return y if z is None else y * F.silu(z.to(y.dtype))


LOG_DECAY_LIMIT = 80.0
"""Log-decays are clamped to +-80 before exp. Below: exp(-80) ~ 2e-35 is nothing next to the
other terms, and torch's vectorised exp takes a slow path (several times slower) for -inf and
for results that underflow, which long or fast-decaying chunks produce. Above: the masked-out
entries (j > i) hold positive log-decays whose exp could overflow to inf, and inf * 0 = nan."""


def _masked_exp_(log_decay, keep):
    """In place: exp(log_decay) where keep (everywhere if None), exactly 0 elsewhere."""
    decay = log_decay.clamp_(-LOG_DECAY_LIMIT, LOG_DECAY_LIMIT).exp_()
    return decay if keep is None else decay.mul_(keep)


def _intra_chunk_decay(cumsum, same_doc):
    """(b, h, c, i, j): exp(cumsum_i - cumsum_j) for j <= i in the same document, else 0.

    Within a chunk the difference of cumsums is exact enough (the CUDA kernels use it too)
    and costs one pass over the (chunk x chunk) blocks less than a segsum.
    """
    size = cumsum.shape[-1]
    keep = torch.ones(size, size, dtype=torch.bool, device=cumsum.device).tril()
    if same_doc is not None:
        keep = keep & same_doc
    return _masked_exp_(cumsum[..., :, None] - cumsum[..., None, :], keep)


def _document_masks(seq_idx, nchunks, chunk_size):
    """Where decay may flow, for packed documents (all None without seq_idx).

    same_doc (b, 1, c, i, j): tokens i and j of a chunk; prev_doc (b, 1, c, i): token i and the
    end of the previous chunk (document 0 before the first); continues (b, 1, c): the end of
    each chunk and the end of the one before it.
    """
    if seq_idx is None:
        return None, None, None
    pad = nchunks * chunk_size - seq_idx.shape[1]
    seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)  # padding continues
    seq = seq.reshape(seq.shape[0], 1, nchunks, chunk_size)
    ends = F.pad(seq[..., -1], (1, 0))
    same_doc = seq[..., :, None] == seq[..., None, :]
    prev_doc = seq == ends[..., :-1, None]
    continues = ends[..., 1:] == ends[..., :-1]
    return same_doc, prev_doc, continues


def _head_major(t):
    """(b, g, c, r, ...) -> a contiguous (b, h, c, ...) copy (r: the heads of a group)."""
    return t.transpose(2, 3).flatten(1, 2).contiguous()


def _per_group(from_start, ngroups):
    """(b, h, c, i) -> (b, g, c, i, r) view."""
    return from_start.unflatten(1, (ngroups, -1)).permute(0, 1, 3, 4, 2)


class _ChunkedScan(torch.autograd.Function):
    """The chunked SSD scan on head-major chunked inputs, with a hand-written backward.

    Inputs: xdt = dt x (b, h, c, i, p), the cumsum of dt A within each chunk (b, h, c, i),
    B and C (b, g, c, i, n), initial states (b, h, p, n) and the document masks. Outputs: the
    within-chunk part of y (b, h, c, i, p), the carried-in part (b, g, c, i, r, p), and,
    group-major, the states before each chunk (b, g, c, r, (p n)) and the final one
    (b, g, r, (p n)).

    Every product is a batched matmul over contiguous blocks: per head for the (chunk x chunk)
    part, per group against all its r heads at once for the state parts. Against autograd's
    backward of the same forward it saves materialised broadcasts, permute copies of
    gradients and passes over the (chunk x chunk) blocks.
    """

    @staticmethod
    def forward(ctx, xdt, cumsum, B, C, initial, same_doc, prev_doc, continues):
        headdim, ngroups, dstate = xdt.shape[-1], B.shape[1], B.shape[-1]
        # Within chunks: y_i = sum_{j <= i} C_i.B_j decay(j -> i) xdt_j
        decay = _intra_chunk_decay(cumsum, same_doc)  # (b, h, c, i, j)
        scores = C @ B.mT  # (b, g, c, i, j)
        weights = (decay.unflatten(1, (ngroups, -1)) * scores[:, :, None]).flatten(1, 2)
        y_diag = weights @ xdt

        # Each chunk's own state at its end: the last row of decay weighs its tokens.
        xdt_to_end = (xdt * decay[..., -1, :, None]).unflatten(1, (ngroups, -1))
        xdt_to_end = xdt_to_end.permute(0, 1, 3, 4, 2, 5).flatten(-2)  # (b, g, c, j, (r p))
        chunk_states = (xdt_to_end.mT @ B).unflatten(3, (-1, headdim))  # (b, g, c, r, p, n)

        # Across chunks.
        chunk_decay = _masked_exp_(cumsum[..., -1].clone(), continues)  # (b, h, c)
        chunk_decay = chunk_decay.unflatten(1, (ngroups, -1)).transpose(2, 3).contiguous()
        starts, final = _scan_chunks(chunk_decay, initial.unflatten(1, (ngroups, -1)).flatten(-2),
                                     chunk_states.flatten(-2))

        # Carry-in: each chunk's start state read out by C, decayed to token i.
        starts_rp = starts.unflatten(-1, (headdim, dstate)).flatten(3, 4)  # (b, g, c, (r p), n)
        read_out = (C @ starts_rp.mT).unflatten(-1, (-1, headdim))  # (b, g, c, i, r, p)
        from_start = _masked_exp_(cumsum.clone(), prev_doc)  # (b, h, c, i)
        y_carry = read_out * _per_group(from_start, ngroups)[..., None]

        ctx.save_for_backward(xdt, B, C, decay, weights, xdt_to_end, starts, chunk_decay,
                              read_out, from_start)
        return y_diag, y_carry, starts, final

    @staticmethod
    def backward(ctx, grad_diag, grad_carry, grad_starts, grad_final):
        xdt, B, C, decay, weights, xdt_to_end, starts, chunk_decay, read_out, from_start = \
            ctx.saved_tensors
        ngroups = B.shape[1]
        grad_C = torch.zeros_like(C)
        grad_cumsum, grad_starts_carry = _carry_backward(grad_carry, grad_C, C, starts, read_out,
                                                         from_start, ngroups)
        if grad_starts is not None:
            grad_starts_carry += grad_starts
        grad_final = torch.zeros_like(starts[:, :, 0]) if grad_final is None else grad_final
        grad_initial, grad_B, grad_xdt, grad_to_end = _states_backward(
            grad_starts_carry, grad_final, grad_cumsum, xdt, B, xdt_to_end, starts, chunk_decay,
            decay, ngroups)

        # Within chunks.
        grad_diag = grad_diag.contiguous()
        grad_weights = grad_diag @ xdt.mT  # (b, h, c, i, j)
        grad_xdt += weights.mT @ grad_diag
        grad_scores = (grad_weights * decay).unflatten(1, (ngroups, -1)).sum(2)
        grad_B += grad_scores.mT @ C
        grad_C += grad_scores @ B
        grad_log = grad_weights.mul_(weights)  # d/d(cumsum_i - cumsum_j); zero where masked
        grad_log[..., -1, :] += grad_to_end * decay[..., -1, :]
        grad_cumsum += grad_log.sum(-1) - grad_log.sum(-2)
        return grad_xdt, grad_cumsum, grad_B, grad_C, grad_initial, None, None, None


def _carry_backward(grad_carry, grad_C, C, starts, read_out, from_start, ngroups):
    """Backward of the carry-in: adds into grad_C; returns d/d cumsum and d/d starts."""
    if grad_carry is None:
        return torch.zeros_like(from_start), torch.zeros_like(starts)
    headdim = read_out.shape[-1]
    grad_carry = grad_carry.contiguous()  # (b, g, c, i, r, p)
    grad_from_start = (grad_carry * read_out).sum(-1)  # (b, g, c, i, r)
    grad_read_out = (grad_carry * _per_group(from_start, ngroups)[..., None]).flatten(-2)
    grad_C += grad_read_out @ starts.unflatten(-1, (headdim, -1)).flatten(3, 4)
    grad_starts = (grad_read_out.mT @ C).unflatten(3, (-1, headdim)).flatten(-2)
    return grad_from_start.permute(0, 1, 4, 2, 3).flatten(1, 2) * from_start, grad_starts


def _scan_chunks(chunk_decay, initial, own):
    """starts[0] = initial; starts[k+1] = chunk_decay[k] starts[k] + own[k], the last of
    which is the final state.

    chunk_decay (b, g, c, r), initial (b, g, r, s), own (b, g, c, r, s): each chunk's state
    from its own tokens. Returns the states before each chunk (b, g, c, r, s), contiguous for
    the read-out's matmul, and the final state (b, g, r, s).
    """
    starts = torch.empty_like(own)
    starts[:, :, 0] = initial
    for k in range(own.shape[2] - 1):
        torch.addcmul(own[:, :, k], chunk_decay[:, :, k, :, None], starts[:, :, k],
                      out=starts[:, :, k + 1])
    final = torch.addcmul(own[:, :, -1], chunk_decay[:, :, -1, :, None], starts[:, :, -1])
    return starts, final


def _scan_chunks_backward(grad_starts, grad_final, starts, chunk_decay):
    """Backward of :func:`_scan_chunks`: d/d initial, d/d own and d/d log chunk_decay.

    The gradient reaching the state before chunk k is its own plus chunk_decay[k] times the
    one reaching the state after it, accumulated from the final state back; the state after
    chunk k is what own[k] feeds.
    """
    grad_own = torch.empty_like(grad_starts)
    grad_own[:, :, -1] = grad_final
    for k in range(grad_starts.shape[2] - 1, 0, -1):
        torch.addcmul(grad_starts[:, :, k], chunk_decay[:, :, k, :, None], grad_own[:, :, k],
                      out=grad_own[:, :, k - 1])
    grad_initial = torch.addcmul(grad_starts[:, :, 0], chunk_decay[:, :, 0, :, None],
                                 grad_own[:, :, 0])
    grad_log_decay = (grad_own * starts).sum(-1) * chunk_decay  # (b, g, c, r)
    return grad_initial, grad_own, grad_log_decay


def _states_backward(grad_starts, grad_final, grad_cumsum, xdt, B, xdt_to_end, starts,
                     chunk_decay, decay, ngroups):
    """Backward of the chunk states and the recurrence across chunks; adds the chunk-level
    decay gradient into grad_cumsum. Returns grad_initial, grad_B, grad_xdt, grad_to_end."""
    headdim = xdt.shape[-1]
    grad_initial, grad_own, grad_log_decay = _scan_chunks_backward(grad_starts, grad_final,
                                                                   starts, chunk_decay)
    grad_cumsum[..., -1] += grad_log_decay.transpose(2, 3).flatten(1, 2)
    grad_initial = grad_initial.reshape(xdt.shape[0], -1, headdim, B.shape[-1])
    grad_chunk = grad_own.unflatten(-1, (headdim, -1)).flatten(3, 4)  # (b, g, c, (r p), n)
    grad_B = xdt_to_end @ grad_chunk
    grad_to_end_x = (B @ grad_chunk.mT).unflatten(-1, (-1, headdim))  # (b, g, c, j, r, p)
    grad_to_end_x = _head_major(grad_to_end_x.transpose(3, 4))  # (b, h, c, j, p)
    grad_xdt = grad_to_end_x * decay[..., -1, :, None]
    grad_to_end = (grad_to_end_x * xdt).sum(-1)  # (b, h, c, j)
    return grad_initial, grad_B, grad_xdt, grad_to_end


def _ssd(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx, state_positions):
    """Chunked scan with discretized ``dt``.

    Returns y (b, l, h, p) including the D skip (no gate), the final states (b, h, p, n) and the
    states after the tokens at ``state_positions`` of batch row 0 (k, h, p, n), or None.

    Layouts are chosen so that every product is a batched matmul over contiguous blocks:
    per head (b, h, c, i, ...) for the (chunk x chunk) part, per group (b, g, c, i, ...)
    against all its heads at once, (r p) = heads of the group x head dim, for the state parts.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    per_group = nheads // ngroups
    dtype = dt.dtype
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen

    def chunked(t):  # (b, l, heads, ...) -> (b, heads, c, chunk, ...); padded tokens: dt = 0
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.unflatten(1, (nchunks, chunk_size)).movedim(3, 1).contiguous()

    def by_group(t):  # (b, h, ...) -> (b, g, r, ...)
        return t.unflatten(1, (ngroups, per_group))

    xdt = chunked(x.to(dtype) * dt[..., None])  # (b, h, c, i, p)
    B, C = chunked(B.to(dtype)), chunked(C.to(dtype))  # (b, g, c, i, n)
    cumsum = chunked(dt * A.to(dtype)).cumsum(-1)  # (b, h, c, i)
    if initial_states is None:
        initial_states = xdt.new_zeros(batch, nheads, headdim, dstate)
    masks = _document_masks(seq_idx, nchunks, chunk_size)
    y_diag, carry, starts, final = _ChunkedScan.apply(xdt, cumsum, B, C,
                                                      initial_states.to(dtype), *masks)

    # Back to tokens (b, l, g, r, p): both parts are views; the first addend sets the layout.
    parts = [by_group(y_diag).permute(0, 3, 4, 1, 2, 5).flatten(1, 2),
             carry.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)]
    if D is not None:
        skip = x.to(dtype) * (D[:, None] if D.dim() == 1 else D).to(dtype)
        parts.insert(0, skip.unflatten(2, (ngroups, per_group)))
    y = parts[0][:, :seqlen]
    for part in parts[1:]:
        y = y + part[:, :seqlen]
    y = y.flatten(2, 3)

    picked = None
    if state_positions is not None:
        picked = _states_after(state_positions, xdt[0], B[0], cumsum[0], starts[0],
                               [None if m is None else m[0, 0] for m in masks])
    return y, final.reshape(batch, nheads, headdim, dstate), picked


def _states_after(positions, xdt, B, cumsum, starts, masks):
    """States after the tokens at ``positions`` of one sequence (k, h, p, n): the own part of
    the token's chunk up to it, plus the chunk's carried-in state decayed to it.

    xdt (h, c, i, p), B (g, c, i, n), cumsum (h, c, i), the states before each chunk
    starts (g, c, r, (p n)); masks: that row's same_doc (c, i, j) and prev_doc (c, i), or None.
    """
    same_doc, prev_doc, _ = masks
    size = cumsum.shape[-1]
    chunk, row = positions.long() // size, positions.long() % size
    cumsum = cumsum[:, chunk]  # (h, k, j)
    keep = torch.arange(size, device=row.device) <= row[:, None]  # (k, j)
    if same_doc is not None:
        keep = keep & same_doc[chunk, row]
    at_row = cumsum.gather(-1, row[None, :, None].expand(cumsum.shape[0], -1, 1))  # (h, k, 1)
    to_row = _masked_exp_(at_row - cumsum, keep)  # (h, k, j)
    own = torch.einsum("gkjn,grkjp->kgrpn", B[:, chunk],
                       (xdt[:, chunk] * to_row[..., None]).unflatten(0, (B.shape[0], -1)))
    from_start = _masked_exp_(at_row[..., 0].clone(), None if prev_doc is None else prev_doc[chunk, row])
    by_head = starts[:, chunk].transpose(1, 2).flatten(0, 1).unflatten(-1, xdt.shape[-1:] + (-1,))
    carried = from_start[..., None, None] * by_head  # (h, k, p, n)
    return own.flatten(1, 2) + carried.transpose(0, 1)


def _without_padding(length: int, *tensors):
    """The tensors with their tokens from ``length`` on zeroed. Megatron-Core's dynamic
    inference pads a step's tokens with rows it never writes (``torch.empty_like``,
    ssm/mamba_mixer.py:524); the Triton scan masks them per position, while this one mixes
    positions in matrix products, where a NaN or inf there (0 * NaN is NaN) would reach the
    sequences' states."""
    if length >= tensors[0].shape[1]:
        return tensors
    return tuple(torch.cat([t[:, :length], t.new_zeros((t.shape[0], t.shape[1] - length,
                                                        *t.shape[2:]))], dim=1)
                 for t in tensors)


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
    if return_varlen_states:
        x, dt, B, C = _without_padding(int(cu_seqlens[-1]), x, dt, B, C)
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
    window = F.pad(xBC, (0, 0, conv1d_weight.shape[1] - 1, 0))  # zero history, tokens-major
    xBC = causal_conv_tokens(window, conv1d_weight, conv1d_bias, seq_idx, activation, xBC.dtype)
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
