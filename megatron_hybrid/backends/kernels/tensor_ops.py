"""Pure-PyTorch versions of the Triton tensor ops Megatron-Core 0.16.1's ``MambaMixer`` uses in
dynamic inference (``inference/contexts/attention_context/triton/tensor_ops.py``, imported by
``ssm/mamba_mixer.py`` line 22): Triton kernels do not run on the CPU. Same signatures and
semantics; rows are the first dimension, and ``pos_on_device`` is a one-element tensor.
"""

from __future__ import annotations

import torch


def tensor_get_slice_after(input_tensor, output_tensor, pos_on_device, check_bounds=False):
    """output_tensor[:n] = input_tensor[pos:pos + n], n as many rows as both have."""
    start = int(pos_on_device[0])
    count = max(0, min(input_tensor.shape[0] - start, output_tensor.shape[0]))
    output_tensor[:count] = input_tensor[start:start + count]


def tensor_merge(tensor_a, tensor_b, pos_on_device, output_tensor=None, check_bounds=False):
    """output[:pos] = tensor_a[:pos], output[pos:pos + len(tensor_b)] = tensor_b (as many
    rows as fit); in place on tensor_a when output_tensor is None."""
    start = int(pos_on_device[0])
    output = tensor_a if output_tensor is None else output_tensor
    if output_tensor is not None:
        output[:start] = tensor_a[:start]
    count = max(0, min(tensor_b.shape[0], output.shape[0] - start))
    output[start:start + count] = tensor_b[:count]


def tensor_masked_update(states: torch.Tensor, idx: torch.Tensor, new_states: torch.Tensor):
    """states[idx[i]] = new_states[i], skipping the -1 entries of idx (padding requests)."""
    kept = idx >= 0
    states[idx[kept].long()] = new_states[kept].to(states.dtype)
