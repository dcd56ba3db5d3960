"""Plain-PyTorch routing tables of a top-k choice (the oracle of the Triton kernels, and the CPU path):
the (T, E) mask of the choice, token_rounding_mask on it when rounding, then the mask's tables,
padded to the same static length as the kernels' output. ``nonzero`` syncs on CUDA; fine here."""

import torch

from ..routing import mask_tables
from ..token_rounding import token_rounding_mask
from .tables import RoutingTables, max_assignments


def route_tokens_reference(select: torch.Tensor, topk_idx: torch.Tensor, tile_m: int = 0) -> RoutingTables:
    t, e = select.shape
    k = topk_idx.shape[1]
    rounding = tile_m > 1
    topk_mask = torch.zeros(t, e, dtype=torch.bool, device=select.device).scatter_(1, topk_idx.long(), True)
    mask = token_rounding_mask(select.detach(), topk_mask, tile_m) if rounding else topk_mask
    token, expert, offsets, dest, token_offsets = mask_tables(mask)
    a_max = max_assignments(t, k, e, tile_m)

    def pad(v: torch.Tensor, dtype) -> torch.Tensor:
        out = torch.zeros(a_max, dtype=dtype, device=select.device)
        out[: v.shape[0]] = v
        return out

    topk_counts = topk_mask.sum(0).to(torch.int32)
    delta = offsets[1:] - offsets[:-1] - topk_counts
    moved = torch.stack([(-delta).clamp_min(0).sum(), delta.clamp_min(0).sum()]).to(torch.int32)
    row_valid = pad(torch.ones(token.shape[0], device=select.device), torch.float32) if rounding else None
    return RoutingTables(
        t, e, k, rounding, offsets, pad(token, torch.int32), pad(token * e + expert, torch.int64), pad(dest, torch.int32),
        token_offsets, topk_counts, moved, row_valid,
    )
