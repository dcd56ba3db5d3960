"""Public entry points for block-sparse attention: argument checks, the reverse block index for
the backward, kernel launches and the autograd.Function. Falls back to the dense-mask reference
when Triton cannot run (plain CPU without TRITON_INTERPRET=1), so CPU users can still train.

Layout: q (Z, Hq, Sq, D), k/v (Z, Hkv, Sk, D), last dim contiguous (other strides free, so the
transposed views from SelfAttention.qkv() go in without a copy). Packed variable-length batches:
Z = 1 and cu_seqlens (n_seq + 1,) int32 gives sequence boundaries along S; block lists are then
(n_seq, Hkv, NQB, MAXSEL) with block numbers counted from each sequence's start.
"""

from typing import Optional

import torch

from .._triton import fp32_dot_options, interpreting, triton_usable
from .kernel_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _dkdv_reduce_kernel
from .kernel_fwd import LOG2E, _fwd_kernel
from .reference import reference_block_sparse_attention

ALLOWED_BLOCKS = (16, 32, 64, 128)


def _check(q, k, v, block_idx, block_count, block_size, cu_q, cu_k, window):
    if block_size not in ALLOWED_BLOCKS:
        raise ValueError(f"block_size must be one of {ALLOWED_BLOCKS}, got {block_size}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if k.shape != v.shape or k.shape[-1] != d or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must both be (batch, kv_heads, seq_k, {d}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"q, k, v must share one dtype of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_idx.dim() != 4 or block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_idx must be an int32/int64 tensor (batch, kv_heads, q_blocks, max_selected), got {block_idx.dtype} {tuple(block_idx.shape)}")
    n_seq = q.shape[0] if cu_q is None else cu_q.numel() - 1
    if cu_q is not None and q.shape[0] != 1:
        raise ValueError("with cu_seqlens, q/k/v must be packed along seq with batch size 1")
    if block_idx.shape[0] != n_seq or block_idx.shape[1] != k.shape[1]:
        raise ValueError(f"block_idx must start with (n_seq={n_seq}, kv_heads={k.shape[1]}), got {tuple(block_idx.shape)}")
    if block_count is not None and block_count.shape != block_idx.shape[:3]:
        raise ValueError(f"block_count must have shape {tuple(block_idx.shape[:3])}, got {tuple(block_count.shape)}")
    if cu_k is not None and (cu_q is None or cu_k.numel() != cu_q.numel()):
        raise ValueError("cu_seqlens_k needs cu_seqlens_q with the same number of sequences")
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")
    if q.is_cuda and q.dtype == torch.float32 and d > 128 and block_size > 64:
        # the dQ program holds a whole 128-query block of fp32 q, dO and dQ rows: 384 KB at head dim 256
        raise ValueError("float32 inputs with head_dim > 128 need block_size <= 64 on a GPU (a 128-token block's fp32 "
                         "tiles exceed an SM's shared memory); use bfloat16/float16 inputs or block_size 64")


def reverse_block_index(block_idx: torch.Tensor, block_count: torch.Tensor, n_kv_blocks: int):
    """CSR transpose of the block lists: for each (seq, kv head, KV block) the query blocks that
    selected it. Returns offsets (Z*Hkv, n_kv_blocks + 1) int32 (global positions into the
    indices) and indices (Z*Hkv*NQB*MAXSEL,) int32. One sort, no dense (NQB, NKB) matrix."""
    z, h, nqb, maxsel = block_idx.shape
    dev = block_idx.device
    valid = torch.arange(maxsel, device=dev) < block_count[..., None].long()
    kv = torch.where(valid, block_idx.long(), n_kv_blocks)  # invalid entries sort last
    qb = torch.arange(nqb, device=dev).view(1, 1, nqb, 1)
    key = (kv * nqb + qb).reshape(z * h, nqb * maxsel)
    sorted_key = key.sort(dim=-1).values
    counts = torch.zeros(z * h, n_kv_blocks + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(1, kv.reshape(z * h, -1), torch.ones_like(key))
    offsets = torch.zeros(z * h, n_kv_blocks + 1, dtype=torch.long, device=dev)
    offsets[:, 1:] = counts[:, :n_kv_blocks].cumsum(dim=1)
    offsets += torch.arange(z * h, device=dev)[:, None] * (nqb * maxsel)
    return offsets.to(torch.int32).contiguous(), (sorted_key % nqb).to(torch.int32).reshape(-1).contiguous()


# fp32 partials of split dK/dV rows live in a workspace of at most this many bytes; the chunk
# length follows from it (a bound known on the host, so the schedule needs no device sync)
DKDV_WORKSPACE_BYTES = 64 << 20
MIN_DKDV_CHUNK = 16


def dkdv_schedule(rev_off: torch.Tensor, max_entries: int, kv_sub: int, d: int, n_sub: int = 1,
                  chunk: Optional[int] = None):
    """Work items of the dK/dV pass: each row -- (sequence * KV head, KV block, slice of kv_sub keys;
    n_sub slices per block) -- has its block's reverse list cut into chunks of at most `chunk`
    entries, rows ordered longest first. Built on the device from the reverse index with no host
    sync; `max_entries` (all list slots) bounds the item count.

    Returns (item_row, item_chunk, row_chunks, row_order, row_chunks_sorted, row_item_end, chunk,
    workspace_slots). item_row is n_rows past the last real item. A split row's items are numbered
    before every unsplit row's (longest first), so item numbers below workspace_slots index its
    fp32 partials: each split row has more than `chunk` entries, hence fewer than 2 * entries / chunk
    chunks, and all of them together fewer than 2 * n_sub * max_entries / chunk."""
    zh, nkb = rev_off.shape[0], rev_off.shape[1] - 1
    n_rows = zh * nkb * n_sub
    entries = n_sub * max_entries  # list entries summed over rows (each slice walks its block's list)
    if chunk is None:
        chunk = max(MIN_DKDV_CHUNK, -(-2 * entries * kv_sub * d * 8 // DKDV_WORKSPACE_BYTES))
    counts = (rev_off[:, 1:] - rev_off[:, :-1])[..., None].expand(zh, nkb, n_sub).reshape(-1)
    row_chunks = ((counts + chunk - 1) // chunk).clamp_min(1).to(torch.int32)
    row_order = torch.argsort(counts, descending=True, stable=True)
    row_chunks_sorted = row_chunks[row_order]
    row_item_end = torch.cumsum(row_chunks_sorted, 0, dtype=torch.int32)
    n_items = n_rows + -(-entries // chunk)
    items = torch.arange(n_items, device=rev_off.device, dtype=torch.int32)
    pos = torch.searchsorted(row_item_end, items, right=True)  # sorted position of each item's row
    real = pos < n_rows
    pos_c = pos.clamp_max(n_rows - 1)
    item_row = torch.where(real, row_order[pos_c], n_rows).to(torch.int32)
    item_chunk = torch.where(real, items - (row_item_end[pos_c] - row_chunks_sorted[pos_c]), 0).to(torch.int32)
    workspace_slots = min(n_items, 2 * entries // chunk)
    return (item_row, item_chunk, row_chunks, row_order.to(torch.int32), row_chunks_sorted, row_item_end, chunk,
            workspace_slots)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Benchmarks (and tests) may pin launch configs here:
#   {"fwd"|"dq": (BLOCK_N, warps, stages[, heads[, prefetch]]), "bwd": (BLOCK_M, warps, stages[, heads[, prefetch]])}
# BLOCK_N / BLOCK_M is the key / query sub-tile (clipped to the block size); heads is
# HEADS_PER_PROGRAM, the number of query heads of one GQA group a program packs into one tile
# (default 1; it must divide the group size). prefetch (0/1, default 0) is IDX_PREFETCH: one flat
# loop over (block, sub-tile) steps (dK/dV: over head groups too) that reads the next step's block
# number one iteration early, so the pipelined tile copies never wait on an index load (see
# kernel_fwd.py); same results bit for bit. "bwd_chunk": the most reverse-list entries one dK/dV
# program takes (default: from DKDV_WORKSPACE_BYTES, see dkdv_schedule); "bwd_kv": keys per dK/dV
# program (see _dkdv_kv_slice); "bwd_entries": reverse-list entries stacked per dK/dV step (see
# _dkdv_entries).
CONFIG_OVERRIDE: dict = {}
ALLOWED_HEADS_PER_PROGRAM = (1, 2, 4)


def _resolve_config(key: str, default: tuple, block: int, group: int):
    """(sub-tile, warps, stages, heads per program, index prefetch) from CONFIG_OVERRIDE[key] or the
    default, checked."""
    cfg = tuple(CONFIG_OVERRIDE.get(key, default))
    if len(cfg) not in (3, 4, 5):
        raise ValueError(
            f"CONFIG_OVERRIDE[{key!r}] must be (sub_tile, warps, stages[, HEADS_PER_PROGRAM[, prefetch]]), got {cfg}")
    sub, warps, stages = cfg[:3]
    heads = cfg[3] if len(cfg) >= 4 else 1
    prefetch = cfg[4] if len(cfg) == 5 else 0
    if sub not in ALLOWED_BLOCKS:
        raise ValueError(f"sub-tile of CONFIG_OVERRIDE[{key!r}] must be one of {ALLOWED_BLOCKS}, got {sub}")
    if heads not in ALLOWED_HEADS_PER_PROGRAM or group % heads:
        raise ValueError(
            f"HEADS_PER_PROGRAM (CONFIG_OVERRIDE[{key!r}][3]) must be one of {ALLOWED_HEADS_PER_PROGRAM} "
            f"and divide the GQA group size (query heads / kv heads = {group}), got {heads}"
        )
    if prefetch not in (0, 1):  # True/False compare equal to 1/0
        raise ValueError(f"prefetch (CONFIG_OVERRIDE[{key!r}][4]) must be 0 or 1, got {prefetch!r}")
    return min(sub, block), warps, stages, heads, bool(prefetch)


# Defaults for block <= 64, head dim <= 128 come from the 32K config sweep on an H200 (benchmark.py,
# bf16, d=128, block 64, GQA 4; the unpacked winner where the GQA group does not divide): query heads
# of a GQA group packed into one program where the group allows it, for 16-bit inputs only (fp32
# tiles of packed programs overflow shared memory).


def _packs(group: int, heads: int, elem_bytes: int) -> bool:
    return elem_bytes <= 2 and group % heads == 0


def _fwd_config(d: int, block: int, group: int = 1, elem_bytes: int = 2):
    """(KV sub-tile, warps, stages, heads per program, index prefetch) of the forward."""
    if interpreting():
        default = (block, 4, 1)
    elif block <= 64 and d <= 128:
        default = (block, 8, 3, 4) if _packs(group, 4, elem_bytes) else (block, 4, 3)
    elif elem_bytes > 2:  # fp32 tiles of 128-token blocks or 256-wide rows: 32-key sub-tiles fit
        default = (32, 8, 2, 1, 1)
    elif d <= 128:  # 128-token blocks: the block-128 sweep's choice (2 heads, 256 rows, 64-key sub-tiles)
        default = (64, 8, 2, 2, 1) if _packs(group, 2, elem_bytes) else (64, 8, 2)
    else:  # 3 stages of 256-wide rows overflow shared memory (compile_check.py);
        # the flat loop holds one sub-tile's buffers, not a whole block's, per stage
        default = (min(block, 64), 8, 2, 1, 1)
    return _resolve_config("fwd", default, block, group)


def _dq_config(d: int, block: int, group: int = 1, elem_bytes: int = 2):
    """(KV sub-tile, warps, stages, heads per program, index prefetch) of the dQ kernel (fp32 dQ
    accumulator plus q and dO tiles)."""
    if interpreting():
        default = (block, 4, 1)
    elif block <= 64 and d <= 128:
        default = (block, 8, 3, 2) if _packs(group, 2, elem_bytes) else (block, 4, 3, 1, 1)
    elif elem_bytes > 2:  # fp32: one stage of 32-key sub-tiles beside the block's q/dO/dQ tiles
        default = (32, 8, 1, 1, 1)
    elif d <= 128:  # 128-token blocks: the block-128 sweep's choice
        default = (32, 8, 3, 1, 1)
    else:  # fits shared memory without register spills on sm_90 (compile_check.py); flat loop as in fwd
        default = (32, 8, 2, 1, 1)
    return _resolve_config("dq", default, block, group)


def _bwd_config(d: int, block: int, group: int = 1, elem_bytes: int = 2):
    """(query sub-tile, warps, stages, heads per program, index prefetch) of the dK/dV kernel (two
    fp32 accumulators of KV slice x d; the query-major score tile stacks _dkdv_entries reverse-list
    entries so it has 64 rows per warpgroup)."""
    if interpreting():
        default = (block, 4, 1)
    elif d <= 64:
        default = (min(block, 64), 4, 3, 1, 1)
    elif d <= 128 and block <= 64:  # 64 score rows, one warpgroup, two programs per SM (fastest in the 32K sweep)
        default = (block, 4, 2, 1, 1)
    elif d <= 128:  # 128-token blocks: 128 score rows on two warpgroups (2 packed heads of 64-query
        # sub-tiles where the group allows: the block-128 sweep's choice); 2 stages fit shared memory
        default = (64, 8, 2, 2, 1) if _packs(group, 2, elem_bytes) else (128, 8, 2, 1, 1)
    else:  # 64 rows of 256-wide q/dO tiles; a 128-key block runs as 32-key slices (_dkdv_kv_slice)
        default = (min(block, 32), 4, 2, 1, 1)
    return _resolve_config("bwd", default, block, group)


ALLOWED_DKDV_ENTRIES = (1, 2, 4, 8)


def _dkdv_entries(sub_m: int, heads: int, warps: int) -> int:
    """Reverse-list entries (query blocks) one dK/dV step stacks into its query-major tile: enough
    that the score tile has 64 rows per warpgroup (wgmma's M). Fewer rows than that and Triton lays
    the chained score dots out over 64 rows per warpgroup anyway: the warpgroups compute copies."""
    default = 1 if interpreting() else max(1, min(8, (16 * warps) // (sub_m * heads)))
    entries = CONFIG_OVERRIDE.get("bwd_entries", default)
    if entries not in ALLOWED_DKDV_ENTRIES:
        raise ValueError(f"CONFIG_OVERRIDE['bwd_entries'] must be one of {ALLOWED_DKDV_ENTRIES}, got {entries!r}")
    return entries


def _dkdv_kv_slice(block: int, d: int) -> int:
    """Keys per dK/dV program: a whole block up to 64 keys (32 at head dim 256); larger blocks are
    split into slices that each walk the same query blocks, since two block x D fp32 accumulators
    plus the K/V tile spill registers and overflow shared memory on an H200 (compile_check.py)."""
    sub = CONFIG_OVERRIDE.get("bwd_kv", block if interpreting() else min(block, 64 if d <= 128 else 32))
    if sub not in ALLOWED_BLOCKS or sub > block:
        raise ValueError(f"CONFIG_OVERRIDE['bwd_kv'] must be one of {ALLOWED_BLOCKS} and at most the block size {block}, got {sub!r}")
    return sub


def _meta(q, k, cu_q, cu_k, block, block_idx):
    z = q.shape[0] if cu_q is None else cu_q.numel() - 1
    if cu_q is None:
        max_q, max_k = q.shape[2], k.shape[2]
    else:
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
    nqb = -(-max_q // block)
    if block_idx.shape[2] < nqb:
        raise ValueError(f"block_idx has {block_idx.shape[2]} query blocks; sequences of {max_q} tokens need {nqb}")
    nkb = -(-max_k // block)
    return z, nqb, nkb


def _forward(q, k, v, idx, cnt, block, cu_q, cu_k, window, sm_scale, key_stride, key_offset):
    zq, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    z, nqb, _ = _meta(q, k, cu_q, cu_k, block, idx)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((zq, hq, sq), dtype=torch.float32, device=q.device)
    sub_n, warps, stages, heads, prefetch = _fwd_config(d, block, hq // hkv, q.element_size())
    dummy = cnt  # any int32 tensor stands in for absent cu_seqlens
    grid = (nqb, z * hq // heads)
    _fwd_kernel[grid](
        q, k, v, o, lse, idx, cnt,
        cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        sq, sk, sm_scale * LOG2E, window or 0,
        HQ=hq, G=hq // hkv, D=d, BLOCK=block, BLOCK_N=sub_n,
        K_STRIDE=key_stride, K_OFF=key_offset, VARLEN=cu_q is not None, HAS_WINDOW=window is not None,
        HEADS_PER_PROGRAM=heads, IDX_PREFETCH=prefetch, num_warps=warps, num_stages=stages, **fp32_dot_options(),
    )
    return o, lse


def _backward(q, k, v, o, lse, do, idx, cnt, block, cu_q, cu_k, window, sm_scale, key_stride, key_offset,
              atomic_dq):
    zq, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    z, nqb, nkb = _meta(q, k, cu_q, cu_k, block, idx)
    sub_n, warps_q, stages_q, heads_q, prefetch_q = _dq_config(d, block, hq // hkv, q.element_size())
    sub_m, warps, stages, heads, prefetch = _bwd_config(d, block, hq // hkv, q.element_size())
    do = _last_contig(do)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    idx_full = idx.expand(z, hkv, *idx.shape[2:])
    cnt_full = cnt.expand(z, hkv, cnt.shape[2])
    rev_off, rev_idx = reverse_block_index(idx_full, cnt_full, nkb)
    dummy = cnt
    cu_q_arg = cu_q if cu_q is not None else dummy
    cu_k_arg = cu_k if cu_k is not None else dummy
    if atomic_dq:
        delta = (do.float() * o.float()).sum(-1)  # (Zq, Hq, Sq), same strides as lse
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        delta = torch.empty_like(lse)  # written by the dQ kernel
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _bwd_dq_kernel[(nqb, z * hq // heads_q)](
            q, k, v, o, do, lse, delta, dq, idx, cnt, cu_q_arg, cu_k_arg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
            idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
            sq, sk, sm_scale * LOG2E, sm_scale, window or 0,
            HQ=hq, G=hq // hkv, D=d, BLOCK=block, BLOCK_N=sub_n,
            K_STRIDE=key_stride, K_OFF=key_offset, VARLEN=cu_q is not None, HAS_WINDOW=window is not None,
            HEADS_PER_PROGRAM=heads_q, IDX_PREFETCH=prefetch_q, num_warps=warps_q, num_stages=stages_q,
            **fp32_dot_options(),
        )
    kv_sub = _dkdv_kv_slice(block, d)
    n_sub = block // kv_sub
    (item_row, item_chunk, row_chunks, row_order, row_chunks_sorted, row_item_end, chunk,
     ws_slots) = dkdv_schedule(rev_off, rev_idx.numel(), kv_sub, d, n_sub, CONFIG_OVERRIDE.get("bwd_chunk"))
    workspace = torch.empty(max(ws_slots, 1), 2, kv_sub, d, dtype=torch.float32, device=q.device)
    n_rows = z * hkv * nkb * n_sub
    _bwd_dkdv_kernel[(item_row.numel(),)](
        q, k, v, do, lse, delta, dk, dv, dq, rev_off, rev_idx, cu_q_arg, cu_k_arg,
        item_row, item_chunk, row_chunks, workspace,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), rev_off.stride(0),
        sq, sk, sm_scale * LOG2E, sm_scale, window or 0, n_rows, nkb, chunk,
        HKV=hkv, G=hq // hkv, D=d, BLOCK=block, BLOCK_M=sub_m,
        K_STRIDE=key_stride, K_OFF=key_offset, VARLEN=cu_q is not None, HAS_WINDOW=window is not None,
        ATOMIC_DQ=atomic_dq, HEADS_PER_PROGRAM=heads, KV_SUB=kv_sub, IDX_PREFETCH=prefetch,
        ENTRIES=_dkdv_entries(sub_m, heads, warps), num_warps=warps,
        num_stages=stages, **fp32_dot_options(),
    )
    n_split_bound = min(n_rows, n_sub * rev_idx.numel() // chunk)  # a split row has more than `chunk` entries
    if n_split_bound:
        block_d = min(d, 64)
        _dkdv_reduce_kernel[(n_split_bound, d // block_d)](
            dk, dv, workspace, row_order, row_chunks_sorted, row_item_end, cu_k_arg,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), sk, sm_scale, nkb,
            HKV=hkv, D=d, BLOCK=block, KV_SUB=kv_sub, BLOCK_D=block_d, VARLEN=cu_q is not None, num_warps=4,
        )
    if atomic_dq:
        dq = dq.to(q.dtype)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, block, cu_q, cu_k, window, sm_scale, key_stride, key_offset, atomic_dq):
        o, lse = _forward(q, k, v, idx, cnt, block, cu_q, cu_k, window, sm_scale, key_stride, key_offset)
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt, cu_q, cu_k)
        ctx.args = (block, window, sm_scale, key_stride, key_offset, atomic_dq)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, idx, cnt, cu_q, cu_k = ctx.saved_tensors
        block, window, sm_scale, key_stride, key_offset, atomic_dq = ctx.args
        dq, dk, dv = _backward(q, k, v, o, lse, do, idx, cnt, block, cu_q, cu_k, window, sm_scale,
                               key_stride, key_offset, atomic_dq)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def sparse_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: Optional[torch.Tensor],
    block_size: int,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    sm_scale: Optional[float] = None,
    key_stride: int = 1,
    key_offset: int = 0,
    deterministic: bool = False,
    atomic_dq: bool = False,
):
    """Block-sparse attention with every option; returns (out, lse). lse is (Z, Hq, Sq) fp32,
    natural log, -inf for rows with no visible key (their output is 0). key_stride/key_offset
    place key n at position n*key_stride + key_offset (NSA's compressed keys).
    The default backward is deterministic (separate dQ pass, the fastest on H200);
    atomic_dq=True adds dQ with fp32 atomics from the dK/dV pass instead (not reproducible)."""
    if deterministic and atomic_dq:
        raise ValueError("atomic_dq=True is not deterministic; pass deterministic=False with it")
    _check(q, k, v, block_idx, block_count, block_size, cu_seqlens_q, cu_seqlens_k, window)
    for config in (_fwd_config, _dq_config, _bwd_config):  # a bad CONFIG_OVERRIDE fails before any work
        config(q.shape[-1], block_size, q.shape[1] // k.shape[1], q.element_size())
    _dkdv_kv_slice(block_size, q.shape[-1])
    sub_m, bwd_warps, _, bwd_heads, _ = _bwd_config(q.shape[-1], block_size, q.shape[1] // k.shape[1],
                                                    q.element_size())
    _dkdv_entries(sub_m, bwd_heads, bwd_warps)
    chunk = CONFIG_OVERRIDE.get("bwd_chunk")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"CONFIG_OVERRIDE['bwd_chunk'] must be a positive int (reverse-list entries per dK/dV program), got {chunk!r}")
    if cu_seqlens_q is not None and cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    if block_count is None:
        block_count = torch.full(block_idx.shape[:3], block_idx.shape[3], dtype=torch.int32, device=block_idx.device)
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if q.dtype == torch.float64 or not triton_usable(q, k, v):
        # too few query blocks is an error here as on the Triton path (where _forward checks it)
        _meta(q, k, cu_seqlens_q, cu_seqlens_k, block_size, block_idx)
        return reference_block_sparse_attention(
            q, k, v, block_idx, block_count, block_size, cu_seqlens_q, cu_seqlens_k, window, sm_scale,
            key_stride, key_offset,
        )
    idx = _last_contig(block_idx.to(torch.int32))
    cnt = _last_contig(block_count.to(torch.int32))
    cu_q = None if cu_seqlens_q is None else cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = None if cu_seqlens_k is None else cu_seqlens_k.to(torch.int32).contiguous()
    return _BlockSparseAttention.apply(
        _last_contig(q), _last_contig(k), _last_contig(v), idx, cnt, block_size, cu_q, cu_k,
        window, float(sm_scale), key_stride, key_offset, atomic_dq,
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: Optional[torch.Tensor] = None,
    block_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    window: Optional[int] = None,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Causal block-sparse attention. Query block i of KV head h's group attends the KV blocks
    block_idx[z, h, i, :block_count[z, h, i]] (all entries if block_count is None), causally
    masked inside each block (and to `window` tokens if given). Entries must be distinct.
    The backward is always deterministic (`deterministic` is accepted for clarity; see
    sparse_attention_core for the atomic-dQ variant). Returns out (like q), or (out, lse)."""
    out, lse = sparse_attention_core(
        q, k, v, block_idx, block_count, block_size, cu_seqlens, None, window, sm_scale,
        deterministic=deterministic,
    )
    return (out, lse) if return_lse else out
