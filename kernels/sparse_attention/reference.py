"""Plain-PyTorch reference for block-sparse attention: turn block lists into a dense token mask
and run masked softmax attention. This is the ground truth for the Triton kernels and the CPU
path for users without Triton; it materialises (S_q, S_k) per head, so only small shapes.

Conventions shared with the kernels (see function.py):
  q (Z, Hq, Sq, D); k, v (Z, Hkv, Sk, D); Hq = G * Hkv (query head h reads KV head h // G).
  block_idx (Z, Hkv, NQB, MAXSEL) int: KV block numbers selected by each query block;
  block_count (Z, Hkv, NQB) int: how many leading entries of block_idx are valid.
  Query block i holds tokens [i*B, (i+1)*B); KV block j holds keys [j*B, (j+1)*B).
  Key n sits at position n*key_stride + key_offset (1, 0 for ordinary keys; NSA's compressed
  keys sit at the end of the span they summarise). A query at position t sees key n iff the
  block is listed, pos(n) <= t, and t - pos(n) < window (when a window is given).
"""

from typing import Optional

import torch


def block_lists_to_mask(
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_len: int,
    k_len: int,
    key_stride: int = 1,
    key_offset: int = 0,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Boolean (Z, Hkv, q_len, k_len) mask, True where a query may attend a key."""
    z, h, nqb, maxsel = block_idx.shape
    nkb = -(-k_len // block_size)
    valid = torch.arange(maxsel, device=block_idx.device) < block_count[..., None].long()
    # invalid entries go to a spare column that is dropped afterwards
    cols = torch.where(valid, block_idx.long(), nkb)
    blocks = torch.zeros(z, h, nqb, nkb + 1, dtype=torch.bool, device=block_idx.device)
    blocks.scatter_(-1, cols, True)
    blocks = blocks[..., :nkb]
    mask = blocks.repeat_interleave(block_size, dim=-2)[..., :q_len, :]
    mask = mask.repeat_interleave(block_size, dim=-1)[..., :k_len]
    qpos = torch.arange(q_len, device=block_idx.device)[:, None]
    kpos = torch.arange(k_len, device=block_idx.device)[None, :] * key_stride + key_offset
    token = kpos <= qpos
    if window is not None:
        token &= (qpos - kpos) < window
    return mask & token


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sm_scale: float):
    """Softmax attention under a (Z, Hkv, Sq, Sk) mask; rows with no key give output 0 and
    lse -inf. Computed in fp32 (or fp64 if the inputs are fp64); differentiable, NaN-free.
    Returns out (in q's dtype) and lse (Z, Hq, Sq) fp32/fp64."""
    g = q.shape[1] // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(acc).repeat_interleave(g, dim=1)
    vf = v.to(acc).repeat_interleave(g, dim=1)
    m = mask.repeat_interleave(g, dim=1)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * sm_scale
    s = s.masked_fill(~m, float("-inf"))
    # the max is detached and made finite so empty rows give p = 0 without NaN gradients
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / denom.clamp_min(torch.finfo(acc).tiny)
    out = torch.matmul(p, vf)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out.to(q.dtype), lse.detach()


def reference_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    sm_scale: Optional[float] = None,
    key_stride: int = 1,
    key_offset: int = 0,
):
    """Reference for `sparse_attention_core` (same arguments). Packed sequences: q is
    (1, Hq, total_q, D), block lists are per sequence (Z = number of sequences)."""
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if cu_seqlens_q is None:
        mask = block_lists_to_mask(
            block_idx, block_count, block_size, q.shape[2], k.shape[2], key_stride, key_offset, window
        )
        return masked_attention(q, k, v, mask, sm_scale)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for z in range(len(cq) - 1):
        qs, ks = slice(cq[z], cq[z + 1]), slice(ck[z], ck[z + 1])
        mask = block_lists_to_mask(
            block_idx[z : z + 1], block_count[z : z + 1], block_size,
            cq[z + 1] - cq[z], ck[z + 1] - ck[z], key_stride, key_offset, window,
        )
        o, lse = masked_attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], mask, sm_scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
