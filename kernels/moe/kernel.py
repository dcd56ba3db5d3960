"""Triton kernels for the MoE expert MLP, all driven by one tile schedule (see routing.py).

Every grouped GEMM walks M-tiles of (expert, rows): program ``pid`` reads its expert from
``tile_expert`` and its rows from ``expert_offsets``, so an expert with 3 tokens costs one partial
tile and an expert with 0 tokens costs nothing; nothing is padded to the largest expert and there
is one launch per stage, never one per expert.

Forward (3 launches):
  1. up_swiglu:   gather x rows by token id (fused gather, no permuted copy of x)
                  -> [gate | up] = x @ W1[e]^T   (two accumulators on one A tile)
                  -> epilogue writes the pre-activation H (kept for backward) and silu(gate)*up.
  2. grouped_gemm: y = weight_a * act @ W2[e]^T, rows scattered to their token-major slot.
  3. segment_sum: out[t] = sum of token t's slots (deterministic, no atomics).
  Stages 1 and 2 cannot be one kernel without atomics or recomputation: every output column of the
  down projection needs every ffn column of the up projection (full reduction), so a fused tile
  would have to hold an (M x D) fp32 accumulator or recompute the up GEMM once per D-tile.
  The combine is a separate pass so that summing over a token's experts needs no atomics.

Backward (5 launches):
  4. down_bwd_swiglu: dact = dy[token] @ W2[e] (fused gather of dy); epilogue recomputes act from H,
                  emits the router-weight gradient <dact, act> (per N-tile partial sums), dH through
                  SwiGLU, and weight_a * act for the W2 gradient.
  5. expert_wgrad: dW2[e] = dy[token]^T @ (weight * act)   (fused gather, loop over the expert's rows)
  6. expert_wgrad: dW1[e] = dH^T @ x[token]                 (fused gather)
  7. grouped_gemm: dx slots = dH @ W1[e], scattered to token-major slots
  8. segment_sum:  dx[t] = sum of token t's slots.

DOT_FP32 / INTERP are set only under the CPU interpreter (Triton 3.9), which mis-multiplies bf16
tl.dot operands and truncates fp32 -> bf16: there operands are upcast (exact: bf16 products fit
fp32) and stores round to nearest-even by hand, matching what the GPU does natively.
"""

import triton
import triton.language as tl


@triton.jit
def _cast(v, ptr, INTERP: tl.constexpr):
    """v (fp32) -> ptr's element type. The CPU interpreter truncates fp32 -> bf16 where the GPU
    rounds to nearest-even, so under it the rounding is done by hand on the bits."""
    if INTERP and ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _tile_rows(pid_m, tile_expert_ptr, tile_offsets_ptr, expert_offsets_ptr, BLOCK_M: tl.constexpr):
    e = tl.load(tile_expert_ptr + pid_m)
    row0 = tl.load(expert_offsets_ptr + e) + (pid_m - tl.load(tile_offsets_ptr + e)) * BLOCK_M
    row_end = tl.load(expert_offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < row_end


@triton.jit
def up_swiglu_kernel(
    x_ptr, w_ptr, tok_ptr, expert_offsets_ptr, tile_expert_ptr, tile_offsets_ptr, h_ptr, act_ptr,
    NUM_EXPERTS, K, F,
    stride_xm, stride_we, stride_wn, stride_hm, stride_am,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(F, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= NUM_EXPERTS:  # past the last real tile of the schedule
        return
    e, rows, rmask = _tile_rows(pid_m, tile_expert_ptr, tile_offsets_ptr, expert_offsets_ptr, BLOCK_M)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + ks[None, :]
    wg_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:  # see the module docstring (interpreter bf16 dot)
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    omask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
    g = _cast(acc_g, h_ptr, DOT_FP32)
    u = _cast(acc_u, h_ptr, DOT_FP32)
    tl.store(h_ptrs, g, mask=omask)
    tl.store(h_ptrs + F, u, mask=omask)
    # SwiGLU from the rounded pre-activation, exactly what backward recomputes.
    gf = g.to(tl.float32)
    act = gf * tl.sigmoid(gf) * u.to(tl.float32)
    tl.store(act_ptr + rows64[:, None] * stride_am + cols[None, :], _cast(act, act_ptr, DOT_FP32), mask=omask)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, scale_ptr, dest_ptr, expert_offsets_ptr, tile_expert_ptr, tile_offsets_ptr,
    NUM_EXPERTS, N, K,
    stride_am, stride_be, stride_bk, stride_bn, stride_cm,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    """c[dest[r]] = scale[r] * a[r] @ B[e] for the expert-sorted rows r of each tile (B[e] is K x N
    through strides, so both W2^T and W1 are read in place)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= NUM_EXPERTS:
        return
    e, rows, rmask = _tile_rows(pid_m, tile_expert_ptr, tile_offsets_ptr, expert_offsets_ptr, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows64[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    dest = tl.load(dest_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tl.store(c_ptr + dest[:, None] * stride_cm + cols[None, :], _cast(acc, c_ptr, DOT_FP32), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def segment_sum_kernel(
    y_ptr, out_ptr, offsets_ptr, T, D, stride_ym, stride_om,
    FIXED_K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr,
):
    """out[t] = sum_{j in [offsets[t], offsets[t+1])} y[j], accumulated in fp32."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if FIXED_K > 0:  # plain top-k: token t owns slots t*k .. t*k+k-1, read as one (T, k, D) tile
        tt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        kk = tl.arange(0, K_POW2)
        j = tt[:, None].to(tl.int64) * FIXED_K + kk[None, :]
        jmask = (tt < T)[:, None] & (kk < FIXED_K)[None, :]
        tile = tl.load(y_ptr + j[:, :, None] * stride_ym + cols[None, None, :], mask=jmask[:, :, None] & cmask[None, None, :], other=0.0)
        acc = tl.sum(tile.to(tl.float32), axis=1)
        o_ptrs = out_ptr + tt[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(o_ptrs, _cast(acc, out_ptr, INTERP), mask=(tt < T)[:, None] & cmask[None, :])
    else:
        t = tl.program_id(0)
        lo = tl.load(offsets_ptr + t)
        hi = tl.load(offsets_ptr + t + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        row_ptr = y_ptr + lo.to(tl.int64) * stride_ym + cols
        for _ in range(lo, hi):
            acc += tl.load(row_ptr, mask=cmask, other=0.0).to(tl.float32)
            row_ptr += stride_ym
        tl.store(out_ptr + t.to(tl.int64) * stride_om + cols, _cast(acc, out_ptr, INTERP), mask=cmask)


@triton.jit
def down_bwd_swiglu_kernel(
    dy_ptr, w_ptr, h_ptr, tok_ptr, weight_ptr, expert_offsets_ptr, tile_expert_ptr, tile_offsets_ptr,
    dh_ptr, actw_ptr, dweight_ptr,
    NUM_EXPERTS, F, K, NUM_ASSIGN,
    stride_dym, stride_we, stride_wk, stride_hm, stride_dhm, stride_awm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    """dact = dy[token] @ W2[e]  (W2[e] is D x F, read with K = D), then in the epilogue:
    router-weight grad partial <dact, act>, dH = SwiGLU'(H) * weight * dact, and weight * act."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(F, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= NUM_EXPERTS:
        return
    e, rows, rmask = _tile_rows(pid_m, tile_expert_ptr, tile_offsets_ptr, expert_offsets_ptr, BLOCK_M)
    rows64 = rows.to(tl.int64)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + tok[:, None] * stride_dym + ks[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wk + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    omask = rmask[:, None] & cmask[None, :]
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
    g = tl.load(h_ptrs, mask=omask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + F, mask=omask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    act = silu * u
    # d out / d weight_a = <dy[token], expert(x)> = <dact, act>; one partial per N-tile, summed on host side.
    tl.store(dweight_ptr + pid_n.to(tl.int64) * NUM_ASSIGN + rows64, tl.sum(acc * act, axis=1), mask=rmask)
    w = tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    dact = acc * w
    dg = dact * u * sig * (1.0 + g * (1.0 - sig))
    du = dact * silu
    dh_ptrs = dh_ptr + rows64[:, None] * stride_dhm + cols[None, :]
    tl.store(dh_ptrs, _cast(dg, dh_ptr, DOT_FP32), mask=omask)
    tl.store(dh_ptrs + F, _cast(du, dh_ptr, DOT_FP32), mask=omask)
    tl.store(actw_ptr + rows64[:, None] * stride_awm + cols[None, :], _cast(act * w, actw_ptr, DOT_FP32), mask=omask)


@triton.jit
def expert_wgrad_kernel(
    l_ptr, r_ptr, out_ptr, tok_ptr, expert_offsets_ptr,
    NI, NJ, stride_lm, stride_rm, stride_oe, stride_oi,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    """out[e] = sum over expert e's rows r of  L[row_l(r)]^T (outer) R[row_r(r)]  (NI x NJ), where a
    gathered side reads row sorted_token[r] of the token-indexed tensor. Experts with no rows
    write zeros, so the gradient is complete without a memset."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    j_tiles = tl.cdiv(NJ, BLOCK_J)
    pid_i = pid // j_tiles
    pid_j = pid % j_tiles
    lo = tl.load(expert_offsets_ptr + e)
    hi = tl.load(expert_offsets_ptr + e + 1)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    imask = ii < NI
    jmask = jj < NJ
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rmask = rows < hi
        if GATHER_L or GATHER_R:
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        if GATHER_L:
            lrow = tok
        else:
            lrow = rows.to(tl.int64)
        if GATHER_R:
            rrow = tok
        else:
            rrow = rows.to(tl.int64)
        lt = tl.load(l_ptr + lrow[:, None] * stride_lm + ii[None, :], mask=rmask[:, None] & imask[None, :], other=0.0)
        rt = tl.load(r_ptr + rrow[:, None] * stride_rm + jj[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
        if DOT_FP32:
            lt, rt = lt.to(tl.float32), rt.to(tl.float32)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=DOT_PRECISION)
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ii[:, None].to(tl.int64) * stride_oi + jj[None, :]
    tl.store(o_ptrs, _cast(acc, out_ptr, DOT_FP32), mask=imask[:, None] & jmask[None, :])
