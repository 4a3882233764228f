"""The cpu backend's pure-PyTorch kernels (megatron_hybrid/backends/kernels) against the real
mamba_ssm Triton kernels and causal_conv1d's CUDA kernel, on a GPU, forward and backward.

Our kernels are imported from their modules directly (no ``backends.install('cpu')``, which
would register them under the mamba_ssm names); mamba_ssm and causal_conv1d are the installed
packages. Both sides get the same tensors on the GPU.

Error measure: ``max|ours - theirs| / max|theirs|`` per output and per gradient. Tolerances:

- fp32, 1e-3. mamba_ssm's fp32 ``tl.dot`` would run in TF32 (10-bit mantissa) by Triton's
  default; the module pins it to IEEE fp32 (``TRITON_F32_DEFAULT=ieee``, own Triton cache) so
  both sides compute in fp32 and differ only in summation order (~1e-6 per operation). The
  scan's exp-of-cumsum chains and the gradient reductions over batch x length x head-dim terms,
  with cancellation, lose up to two or three more digits; a wrong mask, decay or missing term
  errs by 1e-1 or more.
- bf16, 3e-2 forward and 6e-2 backward. bf16's unit roundoff is 2^-8 = 3.9e-3. mamba_ssm rounds
  its intra-chunk operands (the C.B scores, the decayed inputs) to bf16 before each dot product
  and ours keeps them in fp32, so outputs differ by a few bf16 steps of their largest element
  (3e-2 is about 8); a gradient passes through two or three such rounded products.
"""

import pytest
import torch

from megatron_hybrid.backends.kernels import conv1d as our_conv1d
from megatron_hybrid.backends.kernels import ssd as our_ssd

pytestmark = pytest.mark.gpu

TOLERANCE = {  # dtype -> (forward, backward), see the module docstring
    torch.float32: (1e-3, 1e-3),
    torch.bfloat16: (3e-2, 6e-2),
}
CHUNK = 128
SCAN_CASES = ("plain", "seq_idx", "initial_states")


@pytest.fixture(scope="module", autouse=True)
def ieee_fp32_triton(tmp_path_factory):
    """Triton's fp32 dots in IEEE fp32, compiled into a cache of their own (not the TF32 ones)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_F32_DEFAULT", "ieee")
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton_ieee_cache")))
        yield


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.float(), theirs.float()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def assert_close(name_to_pair: dict, tolerance: float, what: str) -> None:
    errors = {name: relative_error(ours, theirs) for name, (ours, theirs) in name_to_pair.items()}
    print(what, " ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    too_far = {name: error for name, error in errors.items() if not error <= tolerance}
    assert not too_far, f"{what}: relative error above {tolerance:g}: {too_far}"


def random(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_(True)


def gradients(output, leaves):
    outputs = output if isinstance(output, tuple) else (output,)
    loss = sum(o.float().pow(2).mean() for o in outputs)
    return torch.autograd.grad(loss, leaves)


def compare(ours_fn, theirs_fn, leaves: dict, dtype, what: str) -> None:
    """Run both on the same leaves; compare every output and the gradient of each leaf."""
    forward_tol, backward_tol = TOLERANCE[dtype]
    results = []
    for fn in (ours_fn, theirs_fn):
        output = fn()
        results.append((output, gradients(output, list(leaves.values()))))
    (ours_out, ours_grads), (theirs_out, theirs_grads) = results
    ours_out = ours_out if isinstance(ours_out, tuple) else (ours_out,)
    theirs_out = theirs_out if isinstance(theirs_out, tuple) else (theirs_out,)
    assert_close({f"out{i}": pair for i, pair in enumerate(zip(ours_out, theirs_out))},
                 forward_tol, f"{what} forward")
    assert_close({f"d{name}": pair for name, pair in zip(leaves, zip(ours_grads, theirs_grads))},
                 backward_tol, f"{what} backward")


def three_documents(batch: int, length: int) -> torch.Tensor:
    """seq_idx with document boundaries inside chunks (not on CHUNK multiples)."""
    seq_idx = torch.zeros(batch, length, dtype=torch.int32, device="cuda")
    seq_idx[:, length // 3:] = 1
    seq_idx[:, 2 * length // 3:] = 2
    return seq_idx


@pytest.mark.parametrize("case", SCAN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_scan_matches_triton(dtype, case):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    torch.manual_seed(0)
    b, length, h, p, g, n = 2, 4 * CHUNK, 8, 64, 2, 64
    leaves = {"x": random(b, length, h, p, dtype=dtype), "dt": random(b, length, h, dtype=dtype, scale=0.5),
              "A": (-torch.rand(h, device="cuda") - 0.5).requires_grad_(True),
              "B": random(b, length, g, n, dtype=dtype), "C": random(b, length, g, n, dtype=dtype),
              "D": random(h), "z": random(b, length, h, p, dtype=dtype), "dt_bias": random(h, scale=0.1)}
    extra = {}
    if case == "initial_states":
        leaves["initial_states"] = extra["initial_states"] = random(b, h, p, n)
    if case == "seq_idx":
        extra["seq_idx"] = three_documents(b, length)

    def call(fn):
        return lambda: fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], CHUNK,
                          D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True,
                          return_final_states=True, **extra)

    compare(call(our_ssd.mamba_chunk_scan_combined), call(mamba_chunk_scan_combined), leaves,
            dtype, f"chunk scan {dtype} {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_selective_state_update_matches_triton(dtype):
    """One decode step as Megatron-Core's MambaMixer.step calls it: dt, A, D and dt_bias per
    head, broadcast over head dim and state; the state stays fp32 and is updated in place."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    torch.manual_seed(0)
    b, h, p, g, n = 4, 8, 64, 2, 64
    state = torch.randn(b, h, p, n, device="cuda")
    x, z = (torch.randn(b, h, p, device="cuda").to(dtype) for _ in range(2))
    dt = torch.randn(b, h, device="cuda").to(dtype)[..., None].expand(b, h, p)
    A = (-torch.rand(h, device="cuda") - 0.5)[:, None, None].expand(h, p, n)
    B, C = (torch.randn(b, g, n, device="cuda").to(dtype) for _ in range(2))
    D = torch.randn(h, device="cuda")[:, None].expand(h, p)
    dt_bias = (torch.randn(h, device="cuda") * 0.1)[:, None].expand(h, p)
    ours_state, theirs_state = state.clone(), state.clone()
    ours = our_ssd.selective_state_update(ours_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                          dt_softplus=True)
    theirs = selective_state_update(theirs_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                    dt_softplus=True)
    assert_close({"out": (ours, theirs), "state": (ours_state, theirs_state)},
                 TOLERANCE[dtype][0], f"state update {dtype}")


@pytest.mark.causal_conv1d
@pytest.mark.parametrize("case", ["plain", "seq_idx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_conv1d_scan_matches_triton(dtype, case):
    """The fused path Megatron-Core's MambaMixer trains with: causal conv, scan, gated RMSNorm
    and out-projection (mamba_ssm runs the conv with causal_conv1d's CUDA kernel)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    torch.manual_seed(0)
    b, length, h, p, g, n, width, d_model = 2, 4 * CHUNK, 8, 64, 2, 64, 4, 256
    dim, conv_dim = h * p, h * p + 2 * g * n
    leaves = {"zxbcdt": random(b, length, 2 * dim + 2 * g * n + h, dtype=dtype),
              "conv_weight": random(conv_dim, width, dtype=dtype, scale=0.3),
              "conv_bias": random(conv_dim, dtype=dtype, scale=0.1),
              "dt_bias": random(h, dtype=dtype, scale=0.1),
              "A": (-torch.rand(h, device="cuda") - 0.5).requires_grad_(True),
              "D": random(h, dtype=dtype), "norm_weight": random(dim, dtype=dtype),
              "out_weight": random(d_model, dim, dtype=dtype, scale=dim ** -0.5)}
    seq_idx = three_documents(b, length) if case == "seq_idx" else None

    def call(fn):
        return lambda: fn(leaves["zxbcdt"], leaves["conv_weight"], leaves["conv_bias"],
                          leaves["dt_bias"], leaves["A"], leaves["D"], CHUNK, seq_idx=seq_idx,
                          activation="silu", rmsnorm_weight=leaves["norm_weight"], rmsnorm_eps=1e-5,
                          outproj_weight=leaves["out_weight"], outproj_bias=None, headdim=p,
                          ngroups=g, norm_before_gate=False)

    compare(call(our_ssd.mamba_split_conv1d_scan_combined), call(mamba_split_conv1d_scan_combined),
            leaves, dtype, f"split conv1d scan {dtype} {case}")


@pytest.mark.causal_conv1d
@pytest.mark.parametrize("case", SCAN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_conv1d_matches_cuda_kernel(dtype, case):
    """Channels-last inputs, the layout causal_conv1d needs for seq_idx and initial states."""
    from causal_conv1d import causal_conv1d_fn

    torch.manual_seed(0)
    b, length, dim, width = 2, 4 * CHUNK, 256, 4
    x = random(b, length, dim, dtype=dtype)
    leaves = {"x": x, "weight": random(dim, width, dtype=dtype, scale=0.3),
              "bias": random(dim, dtype=dtype, scale=0.1)}
    extra = {}
    if case == "initial_states":
        leaves["initial_states"] = random(b, width - 1, dim, dtype=dtype)
        extra = {"initial_states": leaves["initial_states"].transpose(1, 2),
                 "return_final_states": True}
    if case == "seq_idx":
        extra["seq_idx"] = three_documents(b, length)

    def call(fn):
        return lambda: fn(x.transpose(1, 2), leaves["weight"], leaves["bias"], activation="silu",
                          **extra)

    compare(call(our_conv1d.causal_conv1d_fn), call(causal_conv1d_fn), leaves, dtype,
            f"causal conv1d {dtype} {case}")
