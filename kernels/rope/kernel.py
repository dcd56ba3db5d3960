"""Triton rotary embedding for q and (optionally) k in one launch.

One program per (batch, position): it loads that position's cos/sin row once and rotates every
head of q and then of k, a tile of heads at a time. Inputs are read through their full 4-D strides,
so q/k views straight out of a fused projection need no copy; outputs are contiguous (B, S, H, D)
like the reference's torch.cat. The backward is the same rotation with sin negated (the rotation
matrix is orthogonal, so its transpose is its inverse).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X, OUT, x_base, out_base, n_heads, stride_h, stride_d, cos, sin, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h[:, None] < n_heads) & (d[None, :] < half)
        x_ptr = X + x_base + h[:, None] * stride_h + d[None, :] * stride_d
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half * stride_d, mask=mask, other=0.0).to(tl.float32)
        o_ptr = OUT + out_base + h[:, None] * (2 * half) + d[None, :]
        tl.store(o_ptr, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,
    seq_len, half, n_q_heads, n_k_heads,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    s_cos, s_sin,
    HAS_K: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + s * s_cos + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + s * s_sin + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, Q_OUT, b * sq_b + s * sq_s, pid * n_q_heads * 2 * half, n_q_heads, sq_h, sq_d,
                  cos, sin, half, BLOCK_HQ, BLOCK_HALF)
    if HAS_K:
        _rotate_heads(K, K_OUT, b * sk_b + s * sk_s, pid * n_k_heads * 2 * half, n_k_heads, sk_h, sk_d,
                      cos, sin, half, BLOCK_HK, BLOCK_HALF)


def _head_block(n_heads: int, block_half: int) -> int:
    # keep a tile at <= 4K elements per half so registers never spill for big head counts
    return max(1, min(triton.next_power_of_2(n_heads), 4096 // block_half))


def rope(q: torch.Tensor, k, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """Rotate q (and k if given), (B, S, H, D) any strides -> new contiguous tensors.
    inverse=True applies the transpose rotation (the backward)."""
    b, s, hq, d = q.shape
    half = d // 2
    q_out = torch.empty((b, s, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, s, k.shape[2], d), dtype=k.dtype, device=k.device) if k is not None else None
    block_half = triton.next_power_of_2(half)
    kk = k if k is not None else q
    if b * s:
        _rope_kernel[(b * s,)](
            q, kk, q_out, k_out if k_out is not None else q_out, cos, sin,
            s, half, hq, kk.shape[2],
            *q.stride(), *kk.stride(),
            cos.stride(0), sin.stride(0),
            HAS_K=k is not None, INVERSE=inverse,
            BLOCK_HQ=_head_block(hq, block_half), BLOCK_HK=_head_block(kk.shape[2], block_half),
            BLOCK_HALF=block_half, num_warps=4,
        )
    return q_out, k_out
