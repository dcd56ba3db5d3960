"""Triton kernel: N:M mask from scores, one row of M scores per group.

Each program loads BLOCK_G groups as a (BLOCK_G, M_PAD) tile and ranks every entry inside its
group by pairwise comparison (M is at most 32, so the (BLOCK_G, M_PAD, M_PAD) compare is
cheap); an entry is kept when fewer than N entries beat it. "Beat" = larger score, or equal
score at a lower index, which is exactly the stable-sort tie rule of the reference.
"""

import torch
import triton
import triton.language as tl

from .._triton import interpreting


@triton.jit
def _nm_mask_kernel(scores_ptr, mask_ptr, n_groups, N: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, M_PAD)
    offs = g[:, None].to(tl.int64) * M + j[None, :]
    valid = (g[:, None] < n_groups) & (j[None, :] < M)
    # padding gets -inf and a higher index than every real entry, so it never beats one
    s = tl.load(scores_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    s_i = s[:, :, None]
    s_j = s[:, None, :]
    j_lower = j[None, None, :] < j[None, :, None]
    beats = (s_j > s_i) | ((s_j == s_i) & j_lower)
    rank = tl.sum(beats.to(tl.int32), axis=2)
    tl.store(mask_ptr + offs, (rank < N).to(tl.int8), mask=valid)


def nm_mask_triton(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask like `scores` (contiguous, last dim divisible by m)."""
    flat = scores.contiguous().view(-1)
    n_groups = flat.numel() // m
    out = torch.empty(flat.numel(), dtype=torch.int8, device=scores.device)
    m_pad = triton.next_power_of_2(m)
    # the interpreter pays per program, not per element: fewer, bigger blocks there
    block = (4096 if interpreting() else 128) // m_pad * 4
    block = max(16, triton.next_power_of_2(block))
    grid = (triton.cdiv(n_groups, block),)
    _nm_mask_kernel[grid](flat, out, n_groups, N=n, M=m, M_PAD=m_pad, BLOCK_G=block)
    return out.view(torch.bool).view(scores.shape)
