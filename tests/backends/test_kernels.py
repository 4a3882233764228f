"""The pure-PyTorch mamba_ssm / causal_conv1d stand-ins against hand-written references."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.backends.kernels.conv1d import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
)
from megatron_hybrid.backends.kernels.norm_gated import RMSNorm, rmsnorm_fn
from megatron_hybrid.backends.kernels.ssd import (
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    selective_state_update,
)

F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-5)


def make_scan_inputs(batch=2, seqlen=23, nheads=4, headdim=3, ngroups=2, dstate=5,
                     dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=randn(batch, seqlen, nheads, headdim),
        dt=randn(batch, seqlen, nheads),
        A=-torch.rand(nheads, generator=g, dtype=dtype) * 2 - 0.1,
        B=randn(batch, seqlen, ngroups, dstate),
        C=randn(batch, seqlen, ngroups, dstate),
    )


def recurrence(x, dt, A, B, C, D=None, z=None, initial_states=None):
    """Token-by-token Mamba-2 recurrence on a discretized dt: the ground truth."""
    batch, seqlen, nheads, headdim = x.shape
    B = B.repeat_interleave(nheads // B.shape[2], dim=2)
    C = C.repeat_interleave(nheads // C.shape[2], dim=2)
    state = (torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=x.dtype)
             if initial_states is None else initial_states.clone())
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y, state


def discretize(dt, dt_bias=None, softplus=False, limit=(0.0, float("inf"))):
    dt = dt + dt_bias if dt_bias is not None else dt
    return (F.softplus(dt) if softplus else dt).clamp(*limit)


# ---------------------------------------------------------------- chunked scan


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 64])
def test_scan_matches_recurrence(chunk_size):
    inp = make_scan_inputs()
    dt = inp["dt"].abs()
    y = mamba_chunk_scan_combined(inp["x"], dt, inp["A"], inp["B"], inp["C"], chunk_size)
    expected, _ = recurrence(inp["x"], dt, inp["A"], inp["B"], inp["C"])
    torch.testing.assert_close(y, expected, **F64)


@pytest.mark.parametrize("d_has_hdim", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.3, 0.9)])
def test_scan_options_match_recurrence(d_has_hdim, dt_limit):
    inp = make_scan_inputs(ngroups=2, seed=1)
    g = torch.Generator().manual_seed(2)
    nheads, headdim = inp["x"].shape[2:]
    D = torch.randn(*((nheads, headdim) if d_has_hdim else (nheads,)), generator=g,
                    dtype=torch.float64)
    z = torch.randn(inp["x"].shape, generator=g, dtype=torch.float64)
    dt_bias = torch.randn(nheads, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, nheads, headdim, 5, generator=g, dtype=torch.float64)
    y, final = mamba_chunk_scan_combined(
        **inp, chunk_size=8, D=D, z=z, dt_bias=dt_bias, initial_states=h0, dt_softplus=True,
        dt_limit=dt_limit, return_final_states=True)
    dt = discretize(inp["dt"], dt_bias, softplus=True, limit=dt_limit)
    expected, expected_final = recurrence(inp["x"], dt, inp["A"], inp["B"], inp["C"], D, z, h0)
    torch.testing.assert_close(y, expected, **F64)
    torch.testing.assert_close(final, expected_final, **F64)
    if dt_limit[0] > 0:  # the limit must bind somewhere for this case to test it
        assert not torch.equal(dt, discretize(inp["dt"], dt_bias, softplus=True))


def test_scan_fp32_and_bf16_dtypes():
    inp64 = make_scan_inputs(seqlen=200, nheads=4, headdim=8, dstate=16, seed=3)
    inp64["dt"] = inp64["dt"].abs() * 0.2
    expected, expected_final = recurrence(**inp64)
    inp32 = {k: v.float() for k, v in inp64.items()}
    y, final = mamba_chunk_scan_combined(**inp32, chunk_size=64, return_final_states=True)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, **F32)
    torch.testing.assert_close(final.double(), expected_final, **F32)
    y16 = mamba_chunk_scan_combined(**{k: v.bfloat16() for k, v in inp64.items()}, chunk_size=64)
    assert y16.dtype == torch.bfloat16


def documents(lengths_per_row):
    """seq_idx (batch, seqlen) numbering each row's documents 0, 1, 2, ..."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in lengths_per_row])


# Documents crossing chunk boundaries, a whole document inside a chunk, a one-token document.
DOCS = [[5, 9, 1, 8], [12, 3, 8]]


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 32])
def test_scan_seq_idx_equals_separate_documents(chunk_size):
    inp = make_scan_inputs(seed=4)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(inp["x"].shape, generator=g, dtype=torch.float64)
    D = torch.randn(inp["x"].shape[2], generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    seq_idx = documents(DOCS).to(torch.int32)
    dt = inp["dt"].abs()
    y, final = mamba_chunk_scan_combined(
        inp["x"], dt, inp["A"], inp["B"], inp["C"], chunk_size, D=D, z=z, initial_states=h0,
        seq_idx=seq_idx, return_final_states=True)
    for row, lengths in enumerate(DOCS):
        start = 0
        for doc, length in enumerate(lengths):
            part = slice(start, start + length)
            expected, expected_final = recurrence(
                inp["x"][row:row + 1, part], dt[row:row + 1, part], inp["A"],
                inp["B"][row:row + 1, part], inp["C"][row:row + 1, part], D, z[row:row + 1, part],
                # the initial state continues document 0 only
                h0[row:row + 1] if doc == 0 else None)
            torch.testing.assert_close(y[row:row + 1, part], expected, **F64)
            start += length
        torch.testing.assert_close(final[row:row + 1], expected_final, **F64)


def test_scan_varlen_states_are_each_sequences_final_state():
    lengths = [6, 1, 9, 7]
    inp = make_scan_inputs(batch=1, seed=6)
    dt = inp["dt"].abs()
    seq_idx = documents([lengths]).to(torch.int32)
    cu_seqlens = torch.tensor([0, 6, 7, 16, 23], dtype=torch.int32)
    y, final, varlen = mamba_chunk_scan_combined(
        inp["x"], dt, inp["A"], inp["B"], inp["C"], 4, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        return_final_states=True, return_varlen_states=True)
    y_only, varlen_only = mamba_chunk_scan_combined(
        inp["x"], dt, inp["A"], inp["B"], inp["C"], 4, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        return_varlen_states=True)
    assert varlen.shape == (4, 4, 3, 5)
    torch.testing.assert_close(y_only, y, **F64)
    torch.testing.assert_close(varlen_only, varlen, **F64)
    for i in range(len(lengths)):
        part = slice(int(cu_seqlens[i]), int(cu_seqlens[i + 1]))
        _, expected = recurrence(inp["x"][:, part], dt[:, part], inp["A"], inp["B"][:, part],
                                 inp["C"][:, part])
        torch.testing.assert_close(varlen[i:i + 1], expected, **F64)
    torch.testing.assert_close(final, varlen[-1:], **F64)


def test_scan_gradcheck():
    inp = make_scan_inputs(batch=1, seqlen=7, nheads=2, headdim=2, ngroups=1, dstate=3, seed=7)
    g = torch.Generator().manual_seed(8)
    extra = dict(D=torch.randn(2, generator=g, dtype=torch.float64),
                 z=torch.randn(1, 7, 2, 2, generator=g, dtype=torch.float64),
                 dt_bias=torch.randn(2, generator=g, dtype=torch.float64),
                 initial_states=torch.randn(1, 2, 2, 3, generator=g, dtype=torch.float64))
    names = list(inp) + list(extra)
    tensors = [t.clone().requires_grad_() for t in list(inp.values()) + list(extra.values())]
    seq_idx = documents([[3, 4]])

    def scan(*args):
        kwargs = dict(zip(names, args))
        return mamba_chunk_scan_combined(**kwargs, chunk_size=2, seq_idx=seq_idx,
                                         dt_softplus=True, return_final_states=True)

    assert torch.autograd.gradcheck(scan, tensors)


# ---------------------------------------------------------------- causal conv1d


def conv_reference(x, weight, bias=None, activation=None):
    out = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1,
                   groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if activation else out


def make_conv_inputs(batch=2, dim=6, seqlen=23, width=4, seed=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, seqlen, generator=g, dtype=dtype),
            torch.randn(dim, width, generator=g, dtype=dtype),
            torch.randn(dim, generator=g, dtype=dtype))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_reference(activation):
    x, weight, bias = make_conv_inputs()
    torch.testing.assert_close(causal_conv1d_fn(x, weight, bias, activation=activation),
                               conv_reference(x, weight, bias, activation), **F64)
    out32 = causal_conv1d_fn(x.float(), weight.float(), None, activation=activation)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, conv_reference(x, weight, None, activation).float(), **F32)


def test_conv_initial_and_final_states():
    x, weight, bias = make_conv_inputs()
    head, tail = x[..., :10], x[..., 10:]
    out_head, states = causal_conv1d_fn(head, weight, bias, return_final_states=True,
                                        activation="silu")
    into = torch.empty(2, 6, 3, dtype=torch.float64)
    out_tail, final = causal_conv1d_fn(tail, weight, bias, initial_states=states,
                                       return_final_states=True, final_states_out=into,
                                       activation="silu")
    assert final is into
    torch.testing.assert_close(torch.cat([out_head, out_tail], -1),
                               conv_reference(x, weight, bias, "silu"), **F64)
    torch.testing.assert_close(into, x[..., -3:], **F64)
    _, short = causal_conv1d_fn(x[..., :2], weight, return_final_states=True)
    torch.testing.assert_close(short, F.pad(x[..., :2], (1, 0)), **F64)


def test_conv_seq_idx_equals_separate_documents():
    x, weight, bias = make_conv_inputs()
    out = causal_conv1d_fn(x, weight, bias, seq_idx=documents(DOCS).to(torch.int32),
                           activation="silu")
    for row, lengths in enumerate(DOCS):
        start = 0
        for length in lengths:
            part = x[row:row + 1, :, start:start + length]
            torch.testing.assert_close(out[row:row + 1, :, start:start + length],
                                       conv_reference(part, weight, bias, "silu"), **F64)
            start += length
    with pytest.raises(AssertionError):
        causal_conv1d_fn(x, weight, seq_idx=documents(DOCS), initial_states=x[..., :3])


def test_conv_gradcheck():
    x, weight, bias = make_conv_inputs(batch=1, dim=2, seqlen=6, width=3)
    states = torch.randn(1, 2, 2, dtype=torch.float64)
    seq_idx = documents([[2, 4]])
    tensors = [t.requires_grad_() for t in (x, weight, bias, states)]
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: causal_conv1d_fn(x, w, b, initial_states=s, activation="silu",
                                            return_final_states=True), tensors)
    assert torch.autograd.gradcheck(
        lambda x, w, b: causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu"),
        tensors[:3])


def test_conv_update_steps_equal_full_conv():
    x, weight, bias = make_conv_inputs()
    expected = conv_reference(x, weight, bias, "silu")
    # state_len = width like Megatron-Core's conv_state; rows permuted in a larger cache.
    cache = torch.zeros(5, 6, 4, dtype=torch.float64)
    rows = torch.tensor([3, 0], dtype=torch.int32)
    steps = [causal_conv1d_update(x[..., t], cache, weight, bias, "silu",
                                  conv_state_indices=rows) for t in range(10)]
    steps.append(causal_conv1d_update(x[..., 10:], cache, weight, bias, "silu",
                                      conv_state_indices=rows))
    torch.testing.assert_close(torch.cat([s if s.dim() == 3 else s[..., None] for s in steps], -1),
                               expected, **F64)
    torch.testing.assert_close(cache[rows.long()], x[..., -4:], **F64)
    assert cache[[1, 2, 4]].abs().sum() == 0


def test_conv_update_circular_buffer():
    x, weight, bias = make_conv_inputs(batch=2, seqlen=9)
    state_len = 5
    buffer = torch.zeros(2, 6, state_len, dtype=torch.float64)
    outs = []
    for t in range(9):
        seqlens = torch.full((2,), t, dtype=torch.int32)
        outs.append(causal_conv1d_update(x[..., t:t + 1], buffer, weight, bias,
                                         cache_seqlens=seqlens))
    torch.testing.assert_close(torch.cat(outs, -1), conv_reference(x, weight, bias), **F64)
    positions = torch.arange(4, 9) % state_len
    torch.testing.assert_close(buffer[..., positions], x[..., 4:9], **F64)


def test_conv_varlen_states():
    x = torch.randn(20, 3, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 5, 7, 20], dtype=torch.int32)
    states = causal_conv1d_varlen_states(x, cu_seqlens, state_len=4)
    assert states.shape == (3, 3, 4)
    expected = torch.zeros(3, 4, 3, dtype=torch.float64)
    expected[0] = x[1:5]
    expected[1, 2:] = x[5:7]
    expected[2] = x[16:20]
    torch.testing.assert_close(states, expected.transpose(1, 2), **F64)


# ---------------------------------------------------------------- gated RMSNorm


def rmsnorm_reference(x, weight, z, eps, group_size, norm_before_gate):
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], group_size):
        part = x[..., start:start + group_size]
        out[..., start:start + group_size] = part / torch.sqrt(part.pow(2).mean(-1, True) + eps)
    out = out * weight
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rmsnorm(norm_before_gate, group_size):
    g = torch.Generator().manual_seed(20)
    x, z = torch.randn(2, 3, 12, generator=g, dtype=torch.float64).unbind(0)
    norm = RMSNorm(12, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate,
                   dtype=torch.float64)
    assert norm.bias is None and "bias" in norm._parameters  # registered, as in mamba_ssm
    assert (norm.eps, norm.group_size, norm.norm_before_gate) == (1e-5, group_size,
                                                                   norm_before_gate)
    torch.testing.assert_close(norm.weight, torch.ones(12, dtype=torch.float64))
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    expected = rmsnorm_reference(x, norm.weight, z, 1e-5, group_size or 12, norm_before_gate)
    torch.testing.assert_close(norm(x, z), expected, **F64)
    torch.testing.assert_close(norm(x), rmsnorm_reference(x, norm.weight, None, 1e-5,
                                                          group_size or 12, True), **F64)
    bias = torch.randn(12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        rmsnorm_fn(x, norm.weight, bias, eps=1e-5, group_size=group_size),
        rmsnorm_reference(x, norm.weight, None, 1e-5, group_size or 12, True) + bias, **F64)
    if group_size:  # grouping must matter for this case to test it
        assert not torch.allclose(expected, rmsnorm_reference(x, norm.weight, z, 1e-5, 12,
                                                              norm_before_gate))


# ---------------------------------------------------------------- split conv + scan


def make_split_inputs(d_nonssm=0, seqlen=23, seed=30):
    nheads, headdim, ngroups, dstate, width = 4, 3, 2, 5, 4
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(
        zxbcdt=randn(2, seqlen, 2 * d_nonssm + dim + conv_dim + nheads),
        conv1d_weight=randn(conv_dim, width) * 0.5,
        conv1d_bias=randn(conv_dim),
        dt_bias=randn(nheads),
        A=-torch.rand(nheads, generator=g, dtype=torch.float64) - 0.1,
        D=randn(nheads),
    ), dict(nheads=nheads, headdim=headdim, ngroups=ngroups, dstate=dstate, dim=dim)


def split_by_hand(inp, shape, d_nonssm, rmsnorm_weight=None, norm_before_gate=True):
    nheads, headdim, ngroups, dstate, dim = (shape[k] for k in
                                             ("nheads", "headdim", "ngroups", "dstate", "dim"))
    zx0, z, xBC, dt = torch.split(
        inp["zxbcdt"], [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], -1)
    xBC = conv_reference(xBC.transpose(1, 2), inp["conv1d_weight"], inp["conv1d_bias"],
                         "silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], -1)
    gate = None if rmsnorm_weight is not None else z.unflatten(-1, (nheads, headdim))
    y, final = recurrence(x.unflatten(-1, (nheads, headdim)), discretize(dt, inp["dt_bias"], True),
                          inp["A"], B.unflatten(-1, (ngroups, dstate)),
                          C.unflatten(-1, (ngroups, dstate)), inp["D"], gate)
    y = y.flatten(-2)
    if rmsnorm_weight is not None:
        y = rmsnorm_reference(y, rmsnorm_weight, z, 1e-6, dim // ngroups, norm_before_gate)
    if d_nonssm:
        y = torch.cat([F.silu(zx0[..., :d_nonssm]) * zx0[..., d_nonssm:], y], -1)
    return y, final


@pytest.mark.parametrize("d_nonssm", [0, 3])
def test_split_conv_scan_equals_composition(d_nonssm):
    inp, shape = make_split_inputs(d_nonssm)
    out, final = mamba_split_conv1d_scan_combined(**inp, chunk_size=8, headdim=3, ngroups=2,
                                                  return_final_states=True)
    expected, expected_final = split_by_hand(inp, shape, d_nonssm)
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(final, expected_final, **F64)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_split_conv_scan_rmsnorm_outproj_and_hdim_D(norm_before_gate):
    inp, shape = make_split_inputs(d_nonssm=2, seed=31)
    g = torch.Generator().manual_seed(32)
    inp["D"] = torch.randn(4, 3, generator=g, dtype=torch.float64)
    norm_weight = torch.randn(12, generator=g, dtype=torch.float64)
    proj_w = torch.randn(7, 14, generator=g, dtype=torch.float64)
    proj_b = torch.randn(7, generator=g, dtype=torch.float64)
    out = mamba_split_conv1d_scan_combined(
        **inp, chunk_size=8, ngroups=2, rmsnorm_weight=norm_weight, outproj_weight=proj_w,
        outproj_bias=proj_b, norm_before_gate=norm_before_gate)
    expected, _ = split_by_hand(inp, shape, 2, rmsnorm_weight=norm_weight,
                                norm_before_gate=norm_before_gate)
    torch.testing.assert_close(out, F.linear(expected, proj_w, proj_b), **F64)


def test_split_conv_scan_seq_idx_equals_separate_documents():
    inp, shape = make_split_inputs(seed=33)
    seq_idx = documents(DOCS).to(torch.int32)
    out = mamba_split_conv1d_scan_combined(**inp, chunk_size=4, headdim=3, ngroups=2,
                                           seq_idx=seq_idx)
    for row, lengths in enumerate(DOCS):
        start = 0
        for length in lengths:
            part = slice(start, start + length)
            alone = dict(inp, zxbcdt=inp["zxbcdt"][row:row + 1, part])
            expected = mamba_split_conv1d_scan_combined(**alone, chunk_size=4, headdim=3,
                                                        ngroups=2)
            torch.testing.assert_close(out[row:row + 1, part], expected, **F64)
            start += length


# ---------------------------------------------------------------- decode


def test_decode_steps_equal_full_scan():
    """Megatron-Core's _ssm_decode call pattern, token by token, against the full forward."""
    inp, shape = make_split_inputs(seed=40, seqlen=11)
    nheads, headdim, ngroups, dstate, dim = (shape[k] for k in
                                             ("nheads", "headdim", "ngroups", "dstate", "dim"))
    full, full_final = mamba_split_conv1d_scan_combined(**inp, chunk_size=4, headdim=headdim,
                                                        ngroups=ngroups, return_final_states=True)
    rows = torch.tensor([2, 0])
    conv_cache = torch.zeros(3, inp["conv1d_weight"].shape[0], 4, dtype=torch.float64)
    ssm_cache = torch.zeros(3, nheads, headdim, dstate, dtype=torch.float64)
    A = inp["A"][:, None, None].expand(nheads, headdim, dstate)
    dt_bias = inp["dt_bias"][:, None].expand(nheads, headdim)
    D = inp["D"][:, None].expand(nheads, headdim)
    outs = []
    for t in range(11):
        z, xBC, dt = torch.split(inp["zxbcdt"][:, t], [dim, dim + 2 * ngroups * dstate, nheads],
                                 -1)
        xBC = causal_conv1d_update(xBC, conv_cache, inp["conv1d_weight"], inp["conv1d_bias"],
                                   "silu", conv_state_indices=rows)
        x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], -1)
        y = selective_state_update(
            ssm_cache, x.unflatten(-1, (nheads, headdim)), dt[..., None].expand(-1, -1, headdim),
            A, B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate)), D,
            z=z.unflatten(-1, (nheads, headdim)), dt_bias=dt_bias, dt_softplus=True,
            state_batch_indices=rows)
        outs.append(y.flatten(-2))
    torch.testing.assert_close(torch.stack(outs, 1), full, **F64)
    torch.testing.assert_close(ssm_cache[rows], full_final, **F64)
    assert ssm_cache[1].abs().sum() == 0


def test_selective_state_update_without_head_dim():
    g = torch.Generator().manual_seed(41)
    state = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    x, dt, z = torch.randn(3, 2, 6, generator=g, dtype=torch.float64).unbind(0)
    A = -torch.rand(6, 4, generator=g, dtype=torch.float64)
    B, C = torch.randn(2, 2, 4, generator=g, dtype=torch.float64).unbind(0)
    D, dt_bias = torch.randn(2, 6, generator=g, dtype=torch.float64).unbind(0)
    dt_sp = F.softplus(dt + dt_bias)[..., None]
    expected_state = state * torch.exp(dt_sp * A) + dt_sp * B[:, None] * x[..., None]
    expected = (torch.einsum("bdn,bn->bd", expected_state, C) + D * x) * F.silu(z)
    out = selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                 dt_softplus=True)
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(state, expected_state, **F64)


# ---------------------------------------------------------------- register()


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_register_feeds_megatron_core():
    out = run_python(
        "from megatron_hybrid.backends import kernels\n"
        "from megatron_hybrid.backends.kernels import conv1d, norm_gated, ssd\n"
        "assert kernels.register() == ()\n"
        "assert kernels.register() == ()\n"
        "import mamba_ssm, causal_conv1d\n"
        "assert mamba_ssm.__megatron_hybrid_cpu_kernels__ and causal_conv1d.__version__\n"
        "from megatron.core.ssm import mamba_mixer as m\n"
        "assert m.HAVE_MAMBA_SSM\n"
        "assert m.RMSNormGated is norm_gated.RMSNorm\n"
        "assert m.causal_conv1d_fn is conv1d.causal_conv1d_fn\n"
        "assert m.mamba_split_conv1d_scan_combined is ssd.mamba_split_conv1d_scan_combined\n"
        "assert m.selective_state_update is ssd.selective_state_update\n"
        "assert m._check_mamba_sequence_packing_support(False) == (True, None)\n"
        "import modelopt.torch.nas.plugins.megatron as modelopt_plugin\n"
        "assert modelopt_plugin.HAS_MAMBA\n"
        "import transformers.utils.import_utils as t\n"  # find_spec needs a real __spec__
        "assert t._is_package_available('mamba_ssm', return_version=True) == "
        "(True, '2.2.6.post3')\n"
        "from megatron.core.transformer import attention\n"
        "from megatron_hybrid.backends.kernels import paged_attention\n"
        "assert attention.flash_attn_with_kvcache is paged_attention.flash_attn_with_kvcache\n"
        "assert m._check_mamba_sequence_packing_support(True) == (True, None)\n"
        "print('ok')\n")
    assert out.strip().endswith("ok")


def test_importing_kernels_registers_nothing():
    out = run_python(
        "import sys\n"
        "import megatron_hybrid.backends.kernels\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('mamba_ssm', 'causal_conv1d', 'torch')))\n")
    assert out.strip() == "[]"
