"""Pure-PyTorch CPU version of ``mamba_ssm.ops.triton.layernorm_gated``'s gated RMSNorm.

Mirrors mamba_ssm 2.2's ``RMSNorm`` module and ``rmsnorm_fn`` (signatures, attributes, the
``bias`` registered as None) for Megatron-Core 0.16.1's ``MambaMixer``, whose
``ExtendedRMSNorm`` subclasses ``RMSNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.backends.kernels._util import compute_dtype


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """RMSNorm over groups of ``group_size`` channels (None: all channels), optionally gated.

    With z: ``norm(x) * weight * silu(z)`` if norm_before_gate else ``norm(x * silu(z)) * weight``.
    """
    dtype = compute_dtype(x, weight)
    h = x.to(dtype)
    gate = None if z is None else F.silu(z.to(dtype))
    if gate is not None and not norm_before_gate:
        h = h * gate
    groups = h.unflatten(-1, (-1, group_size if group_size is not None else h.shape[-1]))
    h = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    out = h * weight.to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class RMSNorm(torch.nn.Module):
    """Gated RMSNorm; ``group_size`` None means one group of ``hidden_size`` channels."""

    def __init__(
        self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None
    ):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rmsnorm_fn(
            x,
            self.weight,
            self.bias,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )
