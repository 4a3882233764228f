"""Pure-PyTorch CPU versions of ``causal_conv1d``'s public functions.

They mirror the signatures and return conventions of causal_conv1d 1.5 (``causal_conv1d_fn``,
``causal_conv1d_update``, ``causal_conv1d_varlen.causal_conv1d_varlen_states``) as Megatron-Core
0.16.1's ``MambaMixer`` calls them, and are differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.backends.kernels._util import compute_dtype, read_rows, write_rows


def _check_activation(activation: str | None) -> None:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")


def _same_document(seq_idx: torch.Tensor, lag: int) -> torch.Tensor:
    """(batch, seqlen) bool: token t and token t - lag belong to the same document."""
    same = torch.zeros_like(seq_idx, dtype=torch.bool)
    same[:, lag:] = seq_idx[:, lag:] == seq_idx[:, :-lag]
    return same


def _causal_conv(window, weight, bias, seq_idx, activation, out_dtype):
    """Depthwise causal conv of ``window`` = (width - 1 history columns, then the tokens)."""
    dtype = compute_dtype(window, weight)
    width = weight.shape[1]
    seqlen = window.shape[-1] - (width - 1)
    window, weight = window.to(dtype), weight.to(dtype)
    out = torch.zeros(*window.shape[:2], seqlen, dtype=dtype, device=window.device)
    for k in range(width):  # tap k reads token t - lag
        lag = width - 1 - k
        tap = window[..., k : k + seqlen]
        if seq_idx is not None and lag > 0:
            tap = tap * _same_document(seq_idx, lag)[:, None, :]
        out = out + weight[:, k, None] * tap
    if bias is not None:
        out = out + bias.to(dtype)[:, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(out_dtype)


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
):
    """Depthwise causal conv1d.

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen), no
    taps across documents; initial_states: (batch, dim, width - 1); final_states_out:
    (batch, dim, width - 1), written to. Returns out (batch, dim, seqlen), or
    (out, final_states) when return_final_states.
    """
    _check_activation(activation)
    if seq_idx is not None:
        assert initial_states is None, "initial_states must be None if seq_idx is not None"
        assert not return_final_states, "If seq_idx is not None, we don't return final_states_out"
    width = weight.shape[1]
    if initial_states is None:
        initial_states = x.new_zeros(*x.shape[:2], width - 1)
    window = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    out = _causal_conv(window, weight, bias, seq_idx, activation, x.dtype)
    if not return_final_states:
        return out
    final_states = window[..., window.shape[-1] - (width - 1) :]
    if final_states_out is None:
        return out, final_states
    final_states_out.copy_(final_states)
    return out, final_states_out


def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    """Decode step(s): convolve new tokens with the cached ones and update ``conv_state`` in place.

    x: (batch, dim) or (batch, dim, seqlen); conv_state: (batch, dim, state_len), state_len >=
    width - 1, or a larger cache indexed by conv_state_indices (batch,); cache_seqlens: (batch,),
    when given conv_state is a circular buffer written at cache_seqlens % state_len.
    Returns out shaped like x.
    """
    _check_activation(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    width, seqlen = weight.shape[1], x.shape[-1]
    state = read_rows(conv_state, conv_state_indices)
    state_len = state.shape[-1]
    if cache_seqlens is None:
        history = state[..., state_len - (width - 1) :]
        new_state = torch.cat([state, x.to(state.dtype)], dim=-1)[..., -state_len:]
    else:
        offsets = cache_seqlens.long()[:, None, None]
        read_at = (offsets + torch.arange(-(width - 1), 0, device=x.device)) % state_len
        history = state.gather(2, read_at.expand(-1, state.shape[1], -1))
        write_at = (offsets + torch.arange(seqlen, device=x.device)) % state_len
        new_state = state.scatter(2, write_at.expand(-1, state.shape[1], -1), x.to(state.dtype))
    window = torch.cat([history.to(x.dtype), x], dim=-1)  # copies history before the write
    write_rows(conv_state, conv_state_indices, new_state)
    out = _causal_conv(window, weight, bias, None, activation, x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """Conv states after each packed sequence (forward only).

    x: (total_tokens, dim); cu_seqlens: (batch + 1,), sorted, starting at 0. Returns
    (batch, dim, state_len): each sequence's last state_len tokens, zero where the sequence is
    shorter.
    """
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    positions = ends[:, None] + torch.arange(-state_len, 0, device=x.device)
    inside = (positions >= starts[:, None])[..., None]
    states = torch.where(inside, x[positions.clamp(min=0)], x.new_zeros(()))
    return states.transpose(1, 2)
