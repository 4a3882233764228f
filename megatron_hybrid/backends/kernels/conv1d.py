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


class _DepthwiseCausalConv(torch.autograd.Function):
    """Depthwise causal conv, + bias, + optional SiLU, over a tokens-major ``window``
    (b, width - 1 history tokens + seqlen, dim), with a hand-written backward.

    Tokens-major keeps every tap a contiguous (b, seqlen, dim) block and every per-channel
    operand a contiguous row, so each pass is one vectorised sweep; autograd's own backward
    of the taps allocates a zero-padded gradient per tap instead.
    """

    @staticmethod
    def forward(ctx, window, weight, bias, keep, silu):
        """weight (dim, width); bias (dim,) or None; keep: per lag >= 1, a (b, seqlen, 1)
        0/1 tensor of taps that stay inside the token's document, or None."""
        width = weight.shape[1]
        seqlen = window.shape[1] - (width - 1)
        taps = weight.t().contiguous()  # (width, dim); tap k reads token t - (width - 1 - k)
        pre = window[:, width - 1:] * taps[-1]
        if bias is not None:
            pre += bias
        for k in range(width - 1):
            tap = window[:, k:k + seqlen]
            pre.addcmul_(tap if keep is None else tap * keep[width - 1 - k], taps[k])
        ctx.save_for_backward(window, taps, pre)
        ctx.keep, ctx.silu, ctx.has_bias = keep, silu, bias is not None
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, grad_out):
        window, taps, pre = ctx.saved_tensors
        width, seqlen = taps.shape[0], pre.shape[1]
        grad_out = grad_out.contiguous()
        grad_pre = torch.ops.aten.silu_backward(grad_out, pre) if ctx.silu else grad_out
        grad_window = torch.empty_like(window)
        grad_window[:, :width - 1].zero_()
        torch.mul(grad_pre, taps[-1], out=grad_window[:, width - 1:])
        grad_taps = torch.empty_like(taps)
        product = torch.empty_like(grad_pre)
        for k in range(width):
            lag = width - 1 - k
            grad = grad_pre if ctx.keep is None or lag == 0 else grad_pre * ctx.keep[lag]
            if lag:
                grad_window[:, k:k + seqlen].addcmul_(grad, taps[k])
            grad_taps[k] = torch.mul(grad, window[:, k:k + seqlen], out=product).sum((0, 1))
        grad_bias = grad_pre.sum((0, 1)) if ctx.has_bias else None
        return grad_window, grad_taps.t(), grad_bias, None, None


def causal_conv_tokens(window, weight, bias, seq_idx, activation, out_dtype):
    """Depthwise causal conv of a tokens-major ``window`` (b, width - 1 history tokens, then
    the tokens, dim) -> (b, seqlen, dim); no taps across documents of ``seq_idx``."""
    dtype = compute_dtype(window, weight)
    width = weight.shape[1]
    keep = None
    if seq_idx is not None:
        keep = {lag: _same_document(seq_idx, lag)[..., None].to(dtype) for lag in range(1, width)}
    out = _DepthwiseCausalConv.apply(
        window.to(dtype).contiguous(), weight.to(dtype), None if bias is None else bias.to(dtype),
        keep, activation is not None)
    return out.to(out_dtype)


def _causal_conv(window, weight, bias, seq_idx, activation, out_dtype):
    """Depthwise causal conv of a channels-first ``window`` (b, dim, width - 1 + seqlen)."""
    out = causal_conv_tokens(window.transpose(1, 2), weight, bias, seq_idx, activation, out_dtype)
    return out.transpose(1, 2)


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
