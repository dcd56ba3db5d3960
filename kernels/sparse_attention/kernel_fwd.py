"""Triton forward for block-sparse attention (online softmax over the listed KV blocks).

One program per (query block, sequence * group of HEADS_PER_PROGRAM query heads of one GQA group).
It loads its query tile once, walks the KV blocks its KV head's list names for this query block
and keeps the running max / sum in base 2. Writes the output and the natural-log LSE (-inf for
rows that saw no key).
Head packing: the block lists are shared by the query heads of a GQA group, so a program may
stack HEADS_PER_PROGRAM heads' query rows into one (HEADS_PER_PROGRAM*BLOCK, D) tile (row r is
head r // BLOCK, position r % BLOCK in the block). Each K/V tile is then loaded once for all of
them and the MMA has more rows (Hopper tensor cores want >= 128). The stacked tile is a plain
2-D load with per-row pointers (no reshape/join, which differ across triton versions).
Masking (causal by key position, optional window, sequence end) is applied on every tile: it
costs a few vector ops and keeps the kernel correct for any list.
Pipelining (num_stages > 1): Triton's pipeliner turns the K/V tile loads into cp.async copies into
num_stages shared-memory buffers, issued num_stages - 1 iterations ahead (checked on sm_90 with
triton 3.6 and 3.9). The block number they need is a scalar load from the list; by default it is
loaded in the iteration that issues the copies, which wait for it (the wait overlaps the
asynchronous P @ V MMA issued just before). IDX_PREFETCH=True
instead walks one flat loop over (list entry, key sub-tile) and loads the next step's block number
one iteration early (a loop-carried scalar): the copies then never wait for a fresh index load,
and each iteration holds one K and one V sub-tile (not BLOCK // BLOCK_N of each). Same arithmetic
in the same order, so the results are bitwise identical.
"""

import triton
import triton.language as tl

from .._triton import interpreting

# The interpreter (triton 3.9) multiplies bf16 tiles wrongly; bf16 x bf16 products are exact in
# fp32, so upcasting there gives what the tensor cores give (fp32 accumulation).
DOT_UPCAST = tl.constexpr(interpreting())


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with the fp32 operand precision the launch chose (kernels/_triton.py: fp32_dot_options)."""
    if DOT_UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _seq_bounds(CU_Q, CU_K, z, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence z; packed sequences read cu_seqlens."""
    if VARLEN:
        q_start = tl.load(CU_Q + z)
        q_len = tl.load(CU_Q + z + 1) - q_start
        k_start = tl.load(CU_K + z)
        k_len = tl.load(CU_K + z + 1) - k_start
    else:
        q_start = z * 0
        q_len = seqlen_q + z * 0
        k_start = z * 0
        k_len = seqlen_k + z * 0
    return q_start, q_len, k_start, k_len


@triton.jit
def _stacked_rows(pid_m, h0, BLOCK: tl.constexpr, HEADS: tl.constexpr):
    """(head, position) of each row of a tile stacking HEADS copies of query block pid_m."""
    r = tl.arange(0, HEADS * BLOCK)
    return h0 + r // BLOCK, pid_m * BLOCK + r % BLOCK


@triton.jit
def _fwd_tile(q, m_i, l_i, acc, k_base, v_base, n0, offs_m, offs_d, k_len, sks, svs, qk_scale, window,
              BLOCK_N: tl.constexpr, K_STRIDE: tl.constexpr, K_OFF: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N - 1; returns the new (m_i, l_i, acc)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_valid = offs_n < k_len
    k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    kpos = offs_n * K_STRIDE + K_OFF
    keep = n_valid[None, :] & (kpos[None, :] <= offs_m[:, None])
    if HAS_WINDOW:
        keep = keep & ((offs_m[:, None] - kpos[None, :]) < window)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX, CNT, CU_Q, CU_K,
    sqz, sqh, sqs, skz, skh, sks, svz, svh, svs, soz, soh, sos, slz, slh,
    siz, sih, sim, scz, sch,
    seqlen_q, seqlen_k, qk_scale, window,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    K_STRIDE: tl.constexpr, K_OFF: tl.constexpr, VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, IDX_PREFETCH: tl.constexpr = False,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    z = pid // (HQ // HEADS_PER_PROGRAM)
    h0 = (pid % (HQ // HEADS_PER_PROGRAM)) * HEADS_PER_PROGRAM
    hkv = h0 // G  # HEADS_PER_PROGRAM divides G: all heads of the program share this KV head
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, z, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK >= q_len:
        return
    # packed sequences live in batch row 0; otherwise the sequence is the batch row
    if VARLEN:
        bz = z.to(tl.int64) * 0
    else:
        bz = z.to(tl.int64)

    # masks depend on the row's position only, so every head's copy of the block shares them
    head, offs_m = _stacked_rows(pid_m, h0, BLOCK, HEADS_PER_PROGRAM)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < q_len
    q_ptrs = Q + bz * sqz + head[:, None] * sqh + (q_start + offs_m)[:, None] * sqs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None], other=0.0)
    k_base = K + bz * skz + hkv * skh + k_start * sks
    v_base = V + bz * svz + hkv * svh + k_start * svs

    m_i = tl.full([HEADS_PER_PROGRAM * BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS_PER_PROGRAM * BLOCK], dtype=tl.float32)
    acc = tl.zeros([HEADS_PER_PROGRAM * BLOCK, D], dtype=tl.float32)
    idx_base = IDX + z * siz + hkv * sih + pid_m * sim
    cnt = tl.load(CNT + z * scz + hkv * sch + pid_m)
    if IDX_PREFETCH:
        SUB: tl.constexpr = BLOCK // BLOCK_N
        kb = tl.load(idx_base, mask=cnt > 0, other=0)
        for t in range(cnt * SUB):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, kb * BLOCK + (t % SUB) * BLOCK_N, offs_m,
                                      offs_d, k_len, sks, svs, qk_scale, window, BLOCK_N, K_STRIDE, K_OFF, HAS_WINDOW, DOT_PRECISION)
            # block number of step t + 1, read one iteration before the copies that need it
            kb = tl.load(idx_base + (t + 1) // SUB, mask=t + 1 < cnt * SUB, other=0)
    else:
        for i in range(cnt):
            kb = tl.load(idx_base + i)
            for c in tl.static_range(0, BLOCK, BLOCK_N):
                m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, kb * BLOCK + c, offs_m, offs_d, k_len,
                                          sks, svs, qk_scale, window, BLOCK_N, K_STRIDE, K_OFF, HAS_WINDOW, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = O + bz * soz + head[:, None] * soh + (q_start + offs_m)[:, None] * sos + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + bz * slz + head * slh + q_start + offs_m, lse, mask=m_valid)
