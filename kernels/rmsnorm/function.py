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
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
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
        dh = dx.view(shape)
        # h = x + residual, so both inputs receive dh (cast back when their dtypes differ from h's)
        dresidual = dh.to(ctx.residual_dtype) if ctx.has_residual else None
        return dh.to(ctx.x_dtype), dw, None, dresidual


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor]) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"rms_norm: eps must be a float >= 0, got {eps!r}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"rms_norm: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: Optional[torch.Tensor] = None):
    """Fused RMSNorm over the last dim, matching `train.model.norm.RMSNorm`.

    Without residual returns y; with residual returns (y, h) where h = x + residual and
    y = rmsnorm(h). Dtypes follow torch promotion as in the unfused model: h's is that of x and
    residual (e.g. bf16 block output + fp32 residual stream under autocast -> fp32), y's is that
    of h and weight. The normalized row is cast to h's dtype before the weight multiply.
    Gradients flow to x, residual and weight (and to h when it is used downstream).
    """
    _check(x, weight, eps, residual)
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not triton_usable(*tensors):
        return rms_norm_reference(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, float(eps), residual)
