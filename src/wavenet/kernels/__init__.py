"""Hand-written kernels for generation, imported by `wavenet.generation` only when a path asks for one.

`fused_step.fused_steps` runs many autoregressive generation steps of a whole WaveNet in one Triton launch on
a GPU (the kernel also runs on CPU tensors through Triton's interpreter: slow, for tests, never switched on
behind the user's back). `cpu_step.cpu_steps` does the same on the CPU in native code built on first use.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_step_arguments(
    device: torch.device,
    batch: int,
    classes_count: int,
    classes: Tensor,
    out: Tensor,
    noise: Tensor | None,
    forced: Tensor | None,
    logits_out: Tensor | None,
) -> int:
    """Checks the arguments that `fused_steps` and `cpu_steps` share; returns the number of steps.

    Raises:
        ValueError: Naming the argument of the wrong shape, dtype or device, or not contiguous.
    """
    steps = out.shape[0] if out.dim() == 2 else -1
    _check("out", out, (steps, batch), torch.long, device)
    _check("classes", classes, (batch,), torch.long, device)
    for name, tensor, dtype in (("noise", noise, torch.float32), ("logits_out", logits_out, torch.float32)):
        if tensor is not None:
            _check(name, tensor, (steps, batch, classes_count), dtype, device)
    if forced is not None:
        _check("forced", forced, (steps, batch), torch.long, device)
    return steps


def _check(name: str, tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != device or not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )
