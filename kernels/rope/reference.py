"""Plain-PyTorch rotary embedding ("rotate half", HF Llama), the semantics the kernel must match.

Identical to `sparsetron.train.model.rope.apply_rope`: x (B, S, H, D), cos/sin (S, D/2) fp32,
rotation computed in fp32 and cast back to x's dtype.
"""

import torch


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
