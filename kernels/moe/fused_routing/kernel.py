"""Triton kernels of the sync-free routing plan (plain top-k or SonicMoE token rounding).

Three launches, each a grid-wide phase (the next needs all of the previous one's results):
  1. scatter_topk (token blocks): the top-k choice of every token as an (E, T) int8 mask, the
     select scores as (E, T) order-preserving int32 keys (an expert's tokens contiguous, so phase 2
     reads its column with unit stride), and the per-expert counts (one atomic add per expert and
     block: integer sums, so the result is deterministic).
  2. round_experts (one program per expert): every program redoes the rounding decision of all E
     experts from the counts (a few E-wide vector ops; cheaper than another launch), then its own
     expert moves |delta| tokens: a radix select over the expert's keys finds the boundary key, ties
     at the boundary go by token index; the changed mask bits are written back, and the running count
     at every token block (what phase 3 needs to place rows) is stored.
  3. routing_tables (token blocks): row of pair (e, t) = expert_offsets[e] + tokens of e before t
     (the phase-2 prefix of the block + a cumsum inside it); token-major slot = tokens' slots before
     the block (sum of those prefixes over experts) + a cumsum; rows past the real count are zeroed
     and a float row mask (1.0 real, 0.0 padding) is written for the combine weights.
Nothing is read back to the host: the output has a static upper-bound size (see tables.py).

Priority inside an expert: score descending, then token index ascending (token_rounding.priority_key).
"""

import triton
import triton.language as tl


@triton.jit
def _order_key(s):
    """fp32 -> int32 whose signed order is the float order (-0.0 and +0.0 equal)."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s == 0.0, 0, bits)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def scatter_topk_kernel(
    select_ptr, topk_ptr, key_t_ptr, sel_t_ptr, counts_ptr,
    T, E, stride_s,
    K: tl.constexpr, WRITE_KEYS: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """An (E, BLOCK_T) tile: tokens along the contiguous axis of the (E, T) outputs."""
    t0 = tl.program_id(0) * BLOCK_T
    tt = tl.arange(0, BLOCK_T)
    ee = tl.arange(0, E_POW2)
    tmask = tt < T - t0
    emask = ee < E
    m2 = emask[:, None] & tmask[None, :]
    sel = tl.zeros((E_POW2, BLOCK_T), dtype=tl.int32)
    topk_blk = topk_ptr + t0.to(tl.int64) * K
    for j in tl.static_range(K):
        idx = tl.load(topk_blk + tt * K + j, mask=tmask, other=-1).to(tl.int32)
        sel = sel | (idx[None, :] == ee[:, None]).to(tl.int32)
    sel = tl.where(m2, sel, 0)
    tl.atomic_add(counts_ptr + ee, tl.sum(sel, axis=1), mask=emask)
    t_off = ee[:, None] * T + tt[None, :]  # (E, T) layout, from the block's first token
    tl.store(sel_t_ptr + t0 + t_off, sel.to(tl.int8), mask=m2)
    if WRITE_KEYS:
        s = tl.load(select_ptr + t0.to(tl.int64) * stride_s + tt[None, :] * stride_s + ee[:, None], mask=m2, other=0.0)
        tl.store(key_t_ptr + t0 + t_off, _order_key(s.to(tl.float32)), mask=m2)


@triton.jit
def _pick(vec, ee, e):
    """vec[e] of a register vector (a masked sum: Triton has no register indexing)."""
    return tl.sum(tl.where(ee == e, vec, 0), axis=0)


@triton.jit
def _rounded_counts(counts, ee, emask, T, TILE, TILE_BITS: tl.constexpr):
    """round_expert_counts on a register vector: the round-half-even(sum(rem) / TILE) growable experts
    with the largest remainders (ties: lower expert index) go up, the rest down."""
    rem = counts % TILE
    base = counts - rem
    can_grow = (rem > 0) & (base + TILE <= T) & emask
    s = tl.sum(rem, axis=0)
    q = s // TILE
    r = s - q * TILE
    n_up = q + ((2 * r > TILE) | ((2 * r == TILE) & (q % 2 == 1))).to(tl.int32)
    prio = tl.where(can_grow, rem, -1)
    # x = the n_up-th largest priority: the largest x with #(prio >= x) >= n_up, built bit by bit
    # (n_up = 0 gives x > every priority, n_up > #growable gives 0: all growable go up)
    x = tl.sum(ee * 0, axis=0)
    for b in tl.static_range(TILE_BITS):
        cand = x + (1 << (TILE_BITS - 1 - b))
        x = tl.where(tl.sum((prio >= cand).to(tl.int32), axis=0) >= n_up, cand, x)
    above = prio > x
    ties = can_grow & (prio == x)
    tie_rank = tl.cumsum(ties.to(tl.int32), axis=0) - ties.to(tl.int32)
    up = can_grow & (above | (ties & (tie_rank < n_up - tl.sum(above.to(tl.int32), axis=0))))
    return base + TILE * up.to(tl.int32)


@triton.jit
def round_experts_kernel(
    key_t_ptr, sel_t_ptr, counts_ptr, offsets_ptr, blk_prefix_ptr, moved_ptr,
    T, E, TILE, NUM_BLOCKS,
    ROUND: tl.constexpr, TILE_BITS: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr, BT: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    e = tl.program_id(0)
    ee = tl.arange(0, E_POW2)
    emask = ee < E
    counts = tl.load(counts_ptr + ee, mask=emask, other=0)
    if ROUND:
        rounded = _rounded_counts(counts, ee, emask, T, TILE, TILE_BITS)
    else:
        rounded = counts
    first_row = tl.cumsum(rounded, axis=0) - rounded
    tl.store(offsets_ptr + e, _pick(first_row, ee, e))
    if e == 0:  # the totals: row count, and the assignments rounding dropped / added (for logging)
        tl.store(offsets_ptr + E, tl.sum(rounded, axis=0))
        tl.store(moved_ptr, tl.sum(tl.maximum(counts - rounded, 0), axis=0))
        tl.store(moved_ptr + 1, tl.sum(tl.maximum(rounded - counts, 0), axis=0))
    delta = _pick(rounded - counts, ee, e)
    need = tl.abs(delta)
    drop = delta < 0
    key_row = key_t_ptr + e.to(tl.int64) * T
    sel_row = sel_t_ptr + e.to(tl.int64) * T

    # Radix select (RADIX_BITS per sweep, unsigned view u = key + 2^31, "ordered key" ok = key when
    # adding, ~key when dropping: the wanted tokens have the largest ok). After the sweeps, v is the
    # need-th largest ok among the candidates, n_above = #(ok > v) < need <= n_at_least = #(ok >= v).
    v = tl.sum(ee * 0, axis=0)
    n_above = v
    n_at_least = v
    if need > 0:
        digits = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
        prefix = tl.sum(digits * 0, axis=0)
        for level in tl.static_range(32 // RADIX_BITS):
            shift = 32 - RADIX_BITS * (level + 1)
            thr = (prefix + (digits << shift) - 2147483648).to(tl.int32)
            cnt = tl.zeros((1 << RADIX_BITS,), dtype=tl.int32)
            for c0 in range(0, T, CHUNK):
                tt = c0 + tl.arange(0, CHUNK)
                tm = tt < T
                key = tl.load(key_row + tt, mask=tm, other=0)
                s = tl.load(sel_row + tt, mask=tm, other=0)
                cand = tm & ((s != 0) == drop)
                ok = tl.where(drop, ~key, key)
                hit = (ok[:, None] >= thr[None, :]) & cand[:, None]
                cnt += tl.sum(hit.to(tl.int32), axis=0)
            d = tl.sum((cnt >= need).to(tl.int32), axis=0) - 1  # digit 0 always qualifies
            n_at_least = _pick(cnt, digits, d)
            n_above = tl.where(d < (1 << RADIX_BITS) - 1, _pick(cnt, digits, d + 1), n_above)
            prefix += d.to(tl.int64) << shift
        v = (prefix - 2147483648).to(tl.int32)
    n_tie = n_at_least - n_above
    need_tie = need - n_above  # ties taken: the first ones in token order when adding, the last when dropping

    # Write sweep: token blocks of BT, SUB of them per step (an (SUB, BT) tile in token order).
    running = tl.sum(ee * 0, axis=0)
    ties_seen = running
    rows = tl.arange(0, SUB)
    cols = tl.arange(0, BT)
    for b0 in range(0, NUM_BLOCKS, SUB):
        blk = b0 + rows
        tt = blk[:, None] * BT + cols[None, :]
        tm = tt < T
        s = tl.load(sel_row + tt, mask=tm, other=0) != 0
        new = s
        if need > 0:
            key = tl.load(key_row + tt, mask=tm, other=0)
            ok = tl.where(drop, ~key, key)
            cand = tm & (s == drop)
            tie = (cand & (ok == v)).to(tl.int32)
            row_ties = tl.sum(tie, axis=1)
            # rank of each tie in token order: ties before its row + ties before it inside the row
            tie_rank = ties_seen + (tl.cumsum(row_ties, axis=0) - row_ties)[:, None] + tl.cumsum(tie, axis=1) - tie
            ties_seen += tl.sum(row_ties, axis=0)
            take_tie = tl.where(drop, tie_rank >= n_tie - need_tie, tie_rank < need_tie)
            pick = cand & ((ok > v) | ((tie != 0) & take_tie))
            new = s ^ pick
            tl.store(sel_row + tt, new.to(tl.int8), mask=pick)
        blk_count = tl.sum(new.to(tl.int32), axis=1)
        tl.store(blk_prefix_ptr + e.to(tl.int64) * NUM_BLOCKS + blk, running + tl.cumsum(blk_count, axis=0) - blk_count,
                 mask=blk < NUM_BLOCKS)
        running += tl.sum(blk_count, axis=0)


@triton.jit
def routing_tables_kernel(
    sel_t_ptr, blk_prefix_ptr, offsets_ptr, sorted_token_ptr, pair_ptr, dest_ptr, token_offsets_ptr, valid_ptr,
    T, E, NUM_BLOCKS, A_MAX,
    PADDED: tl.constexpr, E_POW2: tl.constexpr, BT: tl.constexpr, PAD_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    ee = tl.arange(0, E_POW2)
    tt = b * BT + tl.arange(0, BT)
    emask = ee < E
    tmask = tt < T
    m2 = emask[:, None] & tmask[None, :]
    sel = tl.load(sel_t_ptr + ee[:, None].to(tl.int64) * T + tt[None, :], mask=m2, other=0).to(tl.int32)  # (E, BT)
    prefix = tl.load(blk_prefix_ptr + ee.to(tl.int64) * NUM_BLOCKS + b, mask=emask, other=0)  # tokens of e before block b
    first_row = tl.load(offsets_ptr + ee, mask=emask, other=0)
    row = first_row[:, None] + prefix[:, None] + tl.cumsum(sel, axis=1) - sel
    per_token = tl.sum(sel, axis=0)
    # slots of the tokens before this block = every expert's rows for them
    slot0 = tl.sum(prefix, axis=0) + tl.cumsum(per_token, axis=0) - per_token
    dest = slot0[None, :] + tl.cumsum(sel, axis=0) - sel  # a token's slots: its experts in ascending order
    keep = sel != 0
    tok2 = tl.zeros((E_POW2, BT), dtype=tl.int32) + tt[None, :]
    tl.store(sorted_token_ptr + row, tok2, mask=keep)
    tl.store(pair_ptr + row, tok2.to(tl.int64) * E + ee[:, None], mask=keep)
    tl.store(dest_ptr + row, dest, mask=keep)
    if PADDED:
        tl.store(valid_ptr + row, tl.full((E_POW2, BT), 1.0, tl.float32), mask=keep)
    tl.store(token_offsets_ptr + tt, slot0, mask=tmask)
    if b == NUM_BLOCKS - 1:
        tl.store(token_offsets_ptr + T, tl.sum(prefix, axis=0) + tl.sum(per_token, axis=0))
    # padding rows [A, A_MAX): token 0, pair 0, slot 0, valid 0.0 (never read by the expert kernels)
    if PADDED:
        a_real = tl.load(offsets_ptr + E)
        zero = tl.zeros((PAD_BLOCK,), dtype=tl.int32)
        for r0 in range(a_real + b * PAD_BLOCK, A_MAX, NUM_BLOCKS * PAD_BLOCK):
            rr = r0 + tl.arange(0, PAD_BLOCK)
            pm = rr < A_MAX
            tl.store(sorted_token_ptr + rr, zero, mask=pm)
            tl.store(pair_ptr + rr, zero.to(tl.int64), mask=pm)
            tl.store(dest_ptr + rr, zero, mask=pm)
            tl.store(valid_ptr + rr, zero.to(tl.float32), mask=pm)
