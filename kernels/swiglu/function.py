"""Autograd wrapper and public entry `swiglu` (Triton when usable, else the PyTorch reference)."""

import torch

from .._triton import triton_usable
from .reference import swiglu_reference


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from . import kernel

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return kernel.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        from . import kernel

        gate, up = ctx.saved_tensors
        return kernel.swiglu_backward(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with a fused Triton forward and backward; output in the inputs' dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate and up must have the same shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}"
        )
    if not gate.is_floating_point():
        raise ValueError(f"swiglu: gate and up must be floating point, got {gate.dtype}")
    if not triton_usable(gate, up):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)
