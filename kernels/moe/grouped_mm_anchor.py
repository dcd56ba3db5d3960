"""Benchmark anchor (a): the best plain-PyTorch MoE layer -- argsort permutation + torch._grouped_mm.

Gathers x into expert order (a real (A, D) copy, kept for backward), two grouped GEMMs with
SwiGLU between them in eager PyTorch, then a weighted index_add combine. Autograd of
torch._grouped_mm does the backward. A padded plan (token rounding) is masked on both sides of the
GEMMs, so no host sync is needed for it either.
"""

import torch
import torch.nn.functional as F

from .routing import Routing


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm exists from torch 2.8; CUDA wants sm90+ and bf16, the CPU path is a fallback."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return True


def moe_experts_grouped_mm(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, routing: Routing) -> torch.Tensor:
    if not grouped_mm_available(x.device, x.dtype):
        raise ValueError(f"torch._grouped_mm is not available for {x.device.type}/{x.dtype} in torch {torch.__version__}")
    offs = routing.expert_offsets[1:].to(torch.int32)
    tok = routing.sorted_token.long()
    xs = x.index_select(0, tok)
    valid = routing.valid_rows()[:, None] if routing.padded else None
    if valid is not None:  # rows past the last group: no gradient may leave them (grouped_mm leaves them unset)
        xs = torch.where(valid, xs, 0)
    h = torch._grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)
    if valid is not None:
        y = torch.where(valid, y, 0)
    y = y * routing.sorted_weight[:, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)
