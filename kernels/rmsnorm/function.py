"""Autograd wrapper and public entry `rms_norm` (Triton when usable, else the PyTorch reference)."""

from typing import Optional

import torch

from .._triton import triton_usable
from .reference import rms_norm_reference


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit last stride, copying only when needed."""
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        from . import kernel

        shape = x.shape
        y, h, rstd = kernel.rms_norm_forward(_rows(x), weight.contiguous(), eps, _rows(residual) if residual is not None else None)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if h is not None else _rows(x), weight, rstd)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        from . import kernel

        h2d, weight, rstd = ctx.saved_tensors
        shape = dy.shape
        dx, dw = kernel.rms_norm_backward(_rows(dy), h2d, weight, rstd, _rows(dh_out) if dh_out is not None else None)
        dx = dx.view(shape)
        # h = x + residual, so both inputs receive the same gradient
        return dx, dw, None, (dx if ctx.has_residual else None)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor]) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"rms_norm: eps must be a float >= 0, got {eps!r}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual must match x in shape and dtype ({tuple(x.shape)}, {x.dtype}), "
            f"got ({tuple(residual.shape)}, {residual.dtype})"
        )
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: Optional[torch.Tensor] = None):
    """Fused RMSNorm over the last dim, matching `train.model.norm.RMSNorm`.

    Without residual returns y; with residual returns (y, h) where h = x + residual (x's dtype)
    and y = rmsnorm(h). y's dtype is the promotion of x's and weight's dtypes, as in the module.
    Gradients flow to x, residual and weight (and to h when it is used downstream).
    """
    _check(x, weight, eps, residual)
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not triton_usable(*tensors):
        return rms_norm_reference(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, float(eps), residual)
