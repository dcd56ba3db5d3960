"""Autograd wrapper and public entry `linear_cross_entropy`.

The gradients are computed in the forward (see kernel.py), so the backward only multiplies them
by grad_output. Under autocast the inputs are cast to the autocast dtype outside the Function (so
autograd routes the gradient back through the casts to fp32 master weights), as F.linear would.
"""

from typing import Optional

import torch

from .._triton import triton_usable
from .reference import linear_cross_entropy_reference


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        from . import kernel

        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = kernel.linear_cross_entropy_forward(
            hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw
        )
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        # 0-dim multiply: no host sync to test grad_loss == 1
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dw = dw * grad_loss.to(dw.dtype) if dw is not None else None
        return dh, dw, None, None, None


def _check(hidden, weight, targets, ignore_index, chunk_size) -> None:
    if hidden.dim() < 2:
        raise ValueError(f"linear_cross_entropy: hidden must be (N, D) (or (..., D)), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, D) with D = hidden's last dim {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight must have at least one vocab row")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64 or int32, got {targets.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(
            f"linear_cross_entropy: hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    # a value check needs a host sync, so do it only where the data already is on the host
    if not targets.is_cuda:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(
                f"linear_cross_entropy: targets must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}"
            )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Mean cross-entropy of (hidden @ weight.T) against targets over targets != ignore_index,
    without materialising the full (N, V) logits. hidden (N, D) or (..., D), weight (V, D),
    targets (N,) or (...). Returns an fp32 scalar (NaN if every target is ignored, as torch).
    chunk_size: tokens per logits chunk (default: logits chunk ~ size of hidden, see kernel.py).
    Targets outside [0, V) are rejected on CPU; on GPU they are not checked (no host sync)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    _check(hidden, weight, targets, ignore_index, chunk_size)
    if not triton_usable(hidden, weight, targets):
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
    from .kernel import default_chunk_size

    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    targets1d = targets.reshape(-1).contiguous()
    n = hidden2d.shape[0]
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], weight.shape[1])
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden2d, weight, targets1d, int(ignore_index), chunk)
