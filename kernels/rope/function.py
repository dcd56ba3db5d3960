"""Autograd wrappers and public entries `apply_rope` / `apply_rope_qk`.

cos/sin are treated as constants (no gradient), as in the model where they are fixed buffers.
"""

import torch

from .._triton import triton_usable
from .reference import apply_rope_qk_reference, apply_rope_reference


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from . import kernel

        ctx.save_for_backward(cos, sin)
        ctx.has_k = k is not None
        q_out, k_out = kernel.rope(q, k, cos, sin)
        return (q_out, k_out) if k is not None else q_out

    @staticmethod
    def backward(ctx, dq, dk=None):
        from . import kernel

        cos, sin = ctx.saved_tensors
        dq_in, dk_in = kernel.rope(dq, dk if ctx.has_k else None, cos, sin, inverse=True)
        return dq_in, dk_in, None, None


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: {name} must be (B, S, H, D) with even D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"apply_rope: {name} must be floating point, got {x.dtype}")
    want = (x.shape[1], x.shape[-1] // 2)
    for table_name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != want:
            raise ValueError(f"apply_rope: {table_name} must have shape (S, D/2) = {want} for {name}, got {tuple(table.shape)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D) (any strides); cos, sin: (S, D/2). Returns x rotated ("rotate half"), in
    x's dtype, contiguous (B, S, H, D). Same contract as `train.model.rope.apply_rope`."""
    _check("x", x, cos, sin)
    if not triton_usable(x, cos, sin):
        return apply_rope_reference(x, cos, sin)
    return RoPEFunction.apply(x, None, _unit_last_stride(cos), _unit_last_stride(sin))


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) in one launch; returns (q_rot, k_rot)."""
    _check("q", q, cos, sin)
    _check("k", k, cos, sin)
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"apply_rope_qk: q and k must share B, S and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if not triton_usable(q, k, cos, sin):
        return apply_rope_qk_reference(q, k, cos, sin)
    return RoPEFunction.apply(q, k, _unit_last_stride(cos), _unit_last_stride(sin))
