"""Plain-PyTorch RMSNorm (+ optional residual add), the semantics the Triton kernel must match.

Same maths as `sparsetron.train.model.norm.RMSNorm`: normalize in float32, cast back to the dtype of
h (x, or x + residual), THEN multiply by the weight (the output dtype is torch's promotion of h's and
the weight's dtypes).
"""

from typing import Optional

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """Without residual: y. With residual: (y, h) where h = x + residual and y = rmsnorm(h)."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y if residual is None else (y, h)
