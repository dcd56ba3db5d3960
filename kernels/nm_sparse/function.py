"""Public entry points: `nm_mask` (Triton when usable, else the reference) and the SR-STE
masked-weight autograd function `srste_masked_weight`."""

from typing import Optional

import torch

from .._triton import triton_usable
from .reference import nm_mask_reference

MAX_M = 32  # the Triton kernel ranks by an (M x M) compare per group


def check_nm(n: int, m: int, name: str = "nm") -> None:
    """ValueError unless 1 <= n <= m <= MAX_M (n == m is the dense start of a gradual ramp)."""
    if not (isinstance(m, int) and 2 <= m <= MAX_M):
        raise ValueError(f"{name}: m must be an int in [2, {MAX_M}], got {m!r}")
    if not (isinstance(n, int) and 1 <= n <= m):
        raise ValueError(f"{name}: n must be an int in [1, m={m}], got {n!r}")


def nm_mask(weight: torch.Tensor, n: int, m: int, scores: Optional[torch.Tensor] = None, use_triton: Optional[bool] = None) -> torch.Tensor:
    """Bool N:M mask of `weight` (out, in) along the input (last) dim: in every group of m
    consecutive inputs of a row, keep the n with the largest score (|weight| by default;
    Wanda passes |W| * ||X||). Ties go to the lower index. No gradient flows through a mask."""
    check_nm(n, m, "nm_mask")
    if weight.dim() < 1 or weight.shape[-1] % m:
        raise ValueError(f"nm_mask: weight's last dim must be divisible by m={m}, got shape {tuple(weight.shape)}")
    if scores is None:
        scores = weight.detach().abs()
    elif scores.shape != weight.shape:
        raise ValueError(f"nm_mask: scores must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    scores = scores.detach()
    if not scores.is_floating_point():
        raise ValueError(f"nm_mask: scores must be floating point, got {scores.dtype}")
    if scores.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if use_triton is None:
        use_triton = triton_usable(scores)
    if use_triton:
        from .kernel import nm_mask_triton

        return nm_mask_triton(scores, n, m)
    return nm_mask_reference(scores, n, m)


class SRSTEMaskedWeight(torch.autograd.Function):
    """W~ = M * W forward; backward is straight-through plus the sparse-refined decay:
    dL/dW = dL/dW~ + decay * (1 - M) * W (SR-STE, Zhou et al. 2021). decay = 0 is plain STE."""

    @staticmethod
    def forward(ctx, weight, mask, decay):
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        if not ctx.decay:
            return grad, None, None
        weight, mask = ctx.saved_tensors
        return torch.addcmul(grad, (~mask).to(weight.dtype), weight, value=ctx.decay), None, None


def srste_masked_weight(weight: torch.Tensor, mask: torch.Tensor, decay: float = 0.0) -> torch.Tensor:
    """Masked weight for the forward with the SR-STE backward.

    Putting the decay inside backward is only right with one backward per optimizer step and no
    loss scaling; `train.sparsity.Sparsifier` therefore passes decay=0 here and adds the decay
    to `.grad` once per step (`before_optimizer_step`)."""
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"srste_masked_weight: mask must be bool with the weight's shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if not (isinstance(decay, (int, float)) and decay >= 0):
        raise ValueError(f"srste_masked_weight: decay must be a float >= 0, got {decay!r}")
    return SRSTEMaskedWeight.apply(weight, mask, float(decay))


def fixed_masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked weight whose gradient is masked too (fixed-mask fine-tuning: pruned weights get
    zero gradient, so Adam state stays zero there)."""
    return weight * mask
