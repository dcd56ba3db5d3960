"""Plain-PyTorch references for N:M masks and the SR-STE gradient (the ground truth the tests use)."""

import torch


def nm_mask_reference(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every group of m consecutive entries of the last dim.

    Ties go to the lower index (stable sort), the same rule the Triton kernel uses, so both
    paths return the identical mask. Returns a bool tensor shaped like `scores`.
    """
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[:, :n], True)
    return mask.view(scores.shape)


def srste_grad_reference(grad_masked: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """SR-STE (Zhou et al. 2021, eq. 4): dense gradient = straight-through g(W~) + lambda * (1 - M) * W."""
    return grad_masked + decay * (~mask).to(weight.dtype) * weight


def nm_pattern_ok(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-group check: at most n nonzeros in each group of m along the last dim (bool per group)."""
    return (weight.reshape(-1, m) != 0).sum(-1) <= n
