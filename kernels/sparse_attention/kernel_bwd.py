"""Triton backward for block-sparse attention, without dense masks.

dK/dV (Flash Sparse Attention ordering): a program owns one KV block of one (sequence, KV head)
row and one chunk of at most CHUNK entries of that block's reverse list (the query blocks that
selected it, built from the block lists in function.py). The KV tile stays in registers while the
program walks every query head of the GQA group and every query block of its chunk, so small GQA
groups still fill the tensor cores along the query dimension. A block selected by few query
blocks is one chunk: its program writes dK/dV directly. A popular block (an attention sink, a
shared prefix: selected by every query block) is split into several chunks, so no single program
walks the whole sequence while the rest of the GPU idles; each chunk writes an fp32 partial and
_dkdv_reduce_kernel adds them in chunk order (fixed order: bitwise reproducible, no atomics).
Work items come longest first (function.py sorts rows by list length), so the heavy ones start
at once and the short ones fill in behind them.

Head packing (HEADS_PER_PROGRAM, 1 = one head at a time): the dK/dV program stacks that many
query heads' (q, dO) sub-tiles into the N dimension of s_t = K Q^T (column r is head r // BLOCK_M,
position r % BLOCK_M of the sub-tile), so its MMAs are wider and the group loop shorter; the dQ
program stacks their rows like the forward (each K/V tile loaded once for all of them).

dQ: by default a separate program per (query block, group of query heads) re-walks the forward's block
list (fixed order, bitwise reproducible; it also computes delta = rowsum(dO*O) and runs first).
The alternative adds dQ from the dK/dV program with fp32 atomics (no recomputation of QK^T and
dO V^T, but order-dependent bits); on H200 it measured 2-3x slower (atomic contention on the
dQ tiles of popular blocks), so it is opt-in (`atomic_dq=True`).

Pipelining as in the forward (see kernel_fwd.py): with num_stages > 1 the q/dO (and lse/delta)
loads of dK/dV and the K/V loads of dQ become multi-buffered cp.async copies. IDX_PREFETCH=True
reads the next block number one iteration early; in dK/dV it also merges the head-group loop and
the query-block loop into one flat loop, so the copy pipeline does not drain and refill at every
head group. Bitwise identical results either way.
"""

import triton
import triton.language as tl

from .kernel_fwd import _dot, _seq_bounds, _stacked_rows

LOG2E = 1.4426950408889634


@triton.jit
def _dkdv_tile(k, v, dk, dv, q_base, do_base, l_base, d_base, dq_base, offs_m, row_ok, offs_d, n_valid, kpos, q_len,
               sqs, sdos, sdqs, qk_scale, sm_scale, window, HAS_WINDOW: tl.constexpr, ATOMIC_DQ: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """dK/dV contributions of the stacked query rows offs_m (row_ok False: a padding row); the *_base
    pointers already hold each row's head. Query-major: s = q k^T has one row per query, so the
    score tile has as many rows as the program stacks (>= 64 per warpgroup, the wgmma M) and
    dV += p^T dO, dK += ds^T q take the transposed tiles from shared memory. (Key-major s^T = k q^T
    would have only the block's keys as rows: with 8 warps Triton then lays the two chained score
    dots out over 128 rows and both warpgroups compute the same 64.) Returns the new (dk, dv); with
    ATOMIC_DQ also adds these rows' dQ."""
    m_valid = row_ok & (offs_m < q_len)
    q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdos + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    lse = tl.load(l_base + offs_m, mask=m_valid, other=float("inf"))
    # rows that saw no key have lse -inf; +inf makes their p exactly 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(d_base + offs_m, mask=m_valid, other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    keep = m_valid[:, None] & n_valid[None, :] & (kpos[None, :] <= offs_m[:, None])
    if HAS_WINDOW:
        keep = keep & ((offs_m[:, None] - kpos[None, :]) < window)
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION)
    dp = _dot(do, tl.trans(v), DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION)
    if ATOMIC_DQ:
        dq = _dot(ds.to(k.dtype), k, DOT_PRECISION) * sm_scale
        tl.atomic_add(dq_base + offs_m[:, None] * sdqs + offs_d[None, :], dq, mask=m_valid[:, None])
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, REV_OFF, REV_IDX, CU_Q, CU_K, ITEM_ROW, ITEM_CHUNK, ROW_CHUNKS, WS,
    sqz, sqh, sqs, skz, skh, sks, svz, svh, svs, sdoz, sdoh, sdos, slz, slh,
    sdkz, sdkh, sdks, sdvz, sdvh, sdvs, sdqz, sdqh, sdqs, srev,
    seqlen_q, seqlen_k, qk_scale, sm_scale, window, n_rows, n_kv_blocks, chunk,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    K_STRIDE: tl.constexpr, K_OFF: tl.constexpr, VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, KV_SUB: tl.constexpr,
    IDX_PREFETCH: tl.constexpr = False, ENTRIES: tl.constexpr = 1,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    item = tl.program_id(0)
    # row = ((sequence * KV head) * n_kv_blocks + KV block) * (BLOCK // KV_SUB) + key slice; n_rows past the last item
    row = tl.load(ITEM_ROW + item)
    if row >= n_rows:
        return
    pid_sub = row % (BLOCK // KV_SUB)
    pid_n = (row // (BLOCK // KV_SUB)) % n_kv_blocks
    pid = row // (BLOCK // KV_SUB) // n_kv_blocks
    z = pid // HKV
    hkv = pid % HKV
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, z, seqlen_q, seqlen_k, VARLEN)
    if pid_n * BLOCK + pid_sub * KV_SUB >= k_len:
        return
    if VARLEN:
        bz = z.to(tl.int64) * 0
    else:
        bz = z.to(tl.int64)

    # a program owns KV_SUB keys of the block (the whole block, or a slice of a 128-key block so the
    # two fp32 accumulators stay in registers)
    offs_n = pid_n * BLOCK + pid_sub * KV_SUB + tl.arange(0, KV_SUB)
    offs_d = tl.arange(0, D)
    n_valid = offs_n < k_len
    kpos = offs_n * K_STRIDE + K_OFF
    k = tl.load(K + bz * skz + hkv * skh + (k_start + offs_n)[:, None] * sks + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    v = tl.load(V + bz * svz + hkv * svh + (k_start + offs_n)[:, None] * svs + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    dk = tl.zeros([KV_SUB, D], dtype=tl.float32)
    dv = tl.zeros([KV_SUB, D], dtype=tl.float32)

    rev_row = REV_OFF + (z * HKV + hkv) * srev + pid_n
    r0 = tl.load(rev_row) + tl.load(ITEM_CHUNK + item) * chunk  # this program's slice of the reverse list
    r1 = tl.minimum(tl.load(rev_row + 1), r0 + chunk)
    # row r of the stacked (q, dO) tile: head r // (ENTRIES * BLOCK_M) of the current head group,
    # reverse-list entry (r // BLOCK_M) % ENTRIES of the current step, position r % BLOCK_M within
    # the query sub-tile. A step past the list's end pads with rows that contribute nothing.
    r = tl.arange(0, HEADS_PER_PROGRAM * ENTRIES * BLOCK_M)
    r_head = r // (ENTRIES * BLOCK_M)
    r_ent = (r // BLOCK_M) % ENTRIES
    r_pos = r % BLOCK_M
    NG: tl.constexpr = G // HEADS_PER_PROGRAM
    if IDX_PREFETCH:
        # one flat loop over (head group, step of ENTRIES selecting query blocks, query sub-tile):
        # the copy pipeline runs on across head groups instead of draining and refilling per group,
        # and the next step's query block numbers are read one iteration early (loop-carried)
        SUB: tl.constexpr = BLOCK // BLOCK_M
        total = NG * ((r1 - r0 + ENTRIES - 1) // ENTRIES) * SUB
        qb = tl.load(REV_IDX + r0 + r_ent, mask=r0 + r_ent < r1, other=-1)
        j = r0
        g = r0 * 0
        for t in range(total):
            head = hkv * G + g * HEADS_PER_PROGRAM + r_head
            dk, dv = _dkdv_tile(
                k, v, dk, dv, Q + bz * sqz + head[:, None] * sqh + q_start * sqs,
                DO + bz * sdoz + head[:, None] * sdoh + q_start * sdos, LSE + bz * slz + head * slh + q_start,
                DELTA + bz * slz + head * slh + q_start, DQ + bz * sdqz + head[:, None] * sdqh + q_start * sdqs,
                qb * BLOCK + (t % SUB) * BLOCK_M + r_pos, qb >= 0, offs_d, n_valid, kpos, q_len, sqs, sdos, sdqs,
                qk_scale, sm_scale, window, HAS_WINDOW, ATOMIC_DQ, DOT_PRECISION)
            # advance to step t + 1: next entries after the last sub-tile, next head group after the list's end
            j = tl.where((t + 1) % SUB == 0, j + ENTRIES, j)
            wrap = j >= r1
            j = tl.where(wrap, r0, j)
            g = tl.where(wrap, g + 1, g)
            j_next = tl.where(t + 1 < total, j, r1)  # past the last step: no load
            qb = tl.load(REV_IDX + j_next + r_ent, mask=j_next + r_ent < r1, other=-1)
    else:
        for g in range(NG):
            head = hkv * G + g * HEADS_PER_PROGRAM + r_head
            q_base = Q + bz * sqz + head[:, None] * sqh + q_start * sqs
            do_base = DO + bz * sdoz + head[:, None] * sdoh + q_start * sdos
            l_base = LSE + bz * slz + head * slh + q_start
            d_base = DELTA + bz * slz + head * slh + q_start
            dq_base = DQ + bz * sdqz + head[:, None] * sdqh + q_start * sdqs
            for j in range(r0, r1, ENTRIES):
                qb = tl.load(REV_IDX + j + r_ent, mask=j + r_ent < r1, other=-1)
                for c in tl.static_range(0, BLOCK, BLOCK_M):
                    dk, dv = _dkdv_tile(k, v, dk, dv, q_base, do_base, l_base, d_base, dq_base, qb * BLOCK + c + r_pos,
                                        qb >= 0, offs_d, n_valid, kpos, q_len, sqs, sdos, sdqs, qk_scale, sm_scale,
                                        window, HAS_WINDOW, ATOMIC_DQ, DOT_PRECISION)

    if tl.load(ROW_CHUNKS + row) == 1:
        dk = dk * sm_scale
        tl.store(DK + bz * sdkz + hkv * sdkh + (k_start + offs_n)[:, None] * sdks + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
        tl.store(DV + bz * sdvz + hkv * sdvh + (k_start + offs_n)[:, None] * sdvs + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=n_valid[:, None])
    else:
        # fp32 partial of one chunk; items of split rows come first, so the item number is the slot
        tile = tl.arange(0, KV_SUB)[:, None] * D + offs_d[None, :]
        ws = WS + item.to(tl.int64) * (2 * KV_SUB * D)
        tl.store(ws + tile, dk)
        tl.store(ws + KV_SUB * D + tile, dv)


@triton.jit
def _dkdv_reduce_kernel(
    DK, DV, WS, ROW_ORDER, ROW_CHUNKS_SORTED, ROW_ITEM_END, CU_K,
    sdkz, sdkh, sdks, sdvz, sdvh, sdvs, seqlen_k, sm_scale, n_kv_blocks,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, KV_SUB: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dK/dV of the rows the dK/dV pass split into chunks: the sum of their fp32 partials in chunk
    order, scaled and written in the output dtype. Program p takes the p-th longest row."""
    p = tl.program_id(0)
    n = tl.load(ROW_CHUNKS_SORTED + p)
    if n <= 1:
        return
    first = tl.load(ROW_ITEM_END + p) - n
    row = tl.load(ROW_ORDER + p)
    pid_sub = row % (BLOCK // KV_SUB)
    pid_n = (row // (BLOCK // KV_SUB)) % n_kv_blocks
    pid = row // (BLOCK // KV_SUB) // n_kv_blocks
    z = pid // HKV
    hkv = pid % HKV
    if VARLEN:
        k_start = tl.load(CU_K + z)
        k_len = tl.load(CU_K + z + 1) - k_start
        bz = z.to(tl.int64) * 0
    else:
        k_start = z * 0
        k_len = seqlen_k + z * 0
        bz = z.to(tl.int64)
    offs_n = pid_n * BLOCK + pid_sub * KV_SUB + tl.arange(0, KV_SUB)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_valid = offs_n < k_len
    tile = tl.arange(0, KV_SUB)[:, None] * D + offs_d[None, :]
    dk = tl.zeros([KV_SUB, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([KV_SUB, BLOCK_D], dtype=tl.float32)
    for i in range(n):
        ws = WS + (first + i).to(tl.int64) * (2 * KV_SUB * D)
        dk += tl.load(ws + tile)
        dv += tl.load(ws + KV_SUB * D + tile)
    dk = dk * sm_scale
    tl.store(DK + bz * sdkz + hkv * sdkh + (k_start + offs_n)[:, None] * sdks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(DV + bz * sdvz + hkv * sdvh + (k_start + offs_n)[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


@triton.jit
def _dq_tile(q, do, lse2, delta, dq, k_base, v_base, n0, offs_m, m_valid, offs_d, k_len, sks, svs, qk_scale, window,
             BLOCK_N: tl.constexpr, K_STRIDE: tl.constexpr, K_OFF: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ contribution (unscaled) of keys n0 .. n0 + BLOCK_N - 1, added to dq."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_valid = offs_n < k_len
    k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
    kpos = offs_n * K_STRIDE + K_OFF
    keep = m_valid[:, None] & n_valid[None, :] & (kpos[None, :] <= offs_m[:, None])
    if HAS_WINDOW:
        keep = keep & ((offs_m[:, None] - kpos[None, :]) < window)
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, IDX, CNT, CU_Q, CU_K,
    sqz, sqh, sqs, skz, skh, sks, svz, svh, svs, soz, soh, sos, sdoz, sdoh, sdos, slz, slh, sdqz, sdqh, sdqs,
    siz, sih, sim, scz, sch,
    seqlen_q, seqlen_k, qk_scale, sm_scale, window,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    K_STRIDE: tl.constexpr, K_OFF: tl.constexpr, VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, IDX_PREFETCH: tl.constexpr = False,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    z = pid // (HQ // HEADS_PER_PROGRAM)
    h0 = (pid % (HQ // HEADS_PER_PROGRAM)) * HEADS_PER_PROGRAM
    hkv = h0 // G
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, z, seqlen_q, seqlen_k, VARLEN)
    if pid_m * BLOCK >= q_len:
        return
    if VARLEN:
        bz = z.to(tl.int64) * 0
    else:
        bz = z.to(tl.int64)

    # stacked rows of HEADS_PER_PROGRAM heads, as in the forward
    head, offs_m = _stacked_rows(pid_m, h0, BLOCK, HEADS_PER_PROGRAM)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < q_len
    rows = (q_start + offs_m)[:, None]
    row_head = head[:, None]
    q = tl.load(Q + bz * sqz + row_head * sqh + rows * sqs + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + bz * sdoz + row_head * sdoh + rows * sdos + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    lse = tl.load(LSE + bz * slz + head * slh + q_start + offs_m, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    # delta = rowsum(dO * O), written for the dK/dV kernel that runs next
    o = tl.load(O + bz * soz + row_head * soh + rows * sos + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bz * slz + head * slh + q_start + offs_m, delta, mask=m_valid)
    k_base = K + bz * skz + hkv * skh + k_start * sks
    v_base = V + bz * svz + hkv * svh + k_start * svs
    dq = tl.zeros([HEADS_PER_PROGRAM * BLOCK, D], dtype=tl.float32)

    idx_base = IDX + z * siz + hkv * sih + pid_m * sim
    cnt = tl.load(CNT + z * scz + hkv * sch + pid_m)
    if IDX_PREFETCH:  # flat loop over (list entry, key sub-tile), next block number read one step early
        SUB: tl.constexpr = BLOCK // BLOCK_N
        kb = tl.load(idx_base, mask=cnt > 0, other=0)
        for t in range(cnt * SUB):
            dq = _dq_tile(q, do, lse2, delta, dq, k_base, v_base, kb * BLOCK + (t % SUB) * BLOCK_N, offs_m, m_valid,
                          offs_d, k_len, sks, svs, qk_scale, window, BLOCK_N, K_STRIDE, K_OFF, HAS_WINDOW, DOT_PRECISION)
            kb = tl.load(idx_base + (t + 1) // SUB, mask=t + 1 < cnt * SUB, other=0)
    else:
        for i in range(cnt):
            kb = tl.load(idx_base + i)
            for c in tl.static_range(0, BLOCK, BLOCK_N):
                dq = _dq_tile(q, do, lse2, delta, dq, k_base, v_base, kb * BLOCK + c, offs_m, m_valid, offs_d, k_len,
                              sks, svs, qk_scale, window, BLOCK_N, K_STRIDE, K_OFF, HAS_WINDOW, DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + bz * sdqz + row_head * sdqh + rows * sdqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_valid[:, None])
