"""Block lists for the sparse attention kinds, built on the device without an (S, S) matrix.

- sliding window / compressed-branch lists: arithmetic (aranges), shared by every head.
- MoBA: query-block x key-block affinity from mean-pooled queries and keys, a (NQB, NKB) matrix
  per KV head (S/B x S/B, not S x S), causal top-k plus the query's own block.
- NSA: importance of each selection block from the compressed branch's attention
  probabilities, summed over the query block and the GQA group. The probabilities are
  (S x S/stride) per head, so a Triton kernel (one program per query block and KV head)
  recomputes them from q, the compressed keys and the compressed branch's LSE and only writes
  their per-query-block sums (NQB x NC); a torch reference does the same densely.
"""

import torch
import triton
import triton.language as tl

from .._triton import fp32_dot_options, interpreting, triton_usable
from .kernel_fwd import _dot


def _arange_lists(lo: torch.Tensor, count: torch.Tensor, width: int):
    """Lists lo[i], lo[i]+1, ... (count[i] entries, padded with 0) as (1, 1, N, width) int32."""
    idx = lo[:, None] + torch.arange(width, device=lo.device)[None, :]
    idx = torch.where(torch.arange(width, device=lo.device)[None, :] < count[:, None], idx, 0)
    return idx.to(torch.int32)[None, None], count.to(torch.int32)[None, None]


def window_block_lists(seq_len: int, block: int, window: int, device=None):
    """Query block i sees KV blocks covering tokens [i*block - window + 1, i*block + block)."""
    nqb = -(-seq_len // block)
    i = torch.arange(nqb, device=device)
    lo = torch.clamp(i * block - window + 1, min=0) // block
    count = i - lo + 1
    width = min(nqb, (window + block - 2) // block + 1)
    return _arange_lists(lo, count, width)


def compressed_block_lists(seq_len: int, n_cmp: int, block: int, stride: int, cmp_block: int, device=None):
    """Query block i (tokens) sees the blocks of compressed keys (block keys each) whose first key
    ends at or before the query block's last token; key c ends at c*stride + cmp_block - 1."""
    nqb = -(-seq_len // block)
    nkb = -(-n_cmp // block)
    last = torch.clamp(torch.arange(nqb, device=device) * block + block - 1, max=seq_len - 1)
    reach = last - (cmp_block - 1)  # position of the last visible key end, minus its offset
    count = torch.where(reach >= 0, torch.clamp(reach // (block * stride) + 1, max=nkb), 0)
    return _arange_lists(torch.zeros_like(count), count, max(nkb, 1))


def _finish_topk(scores: torch.Tensor, k: int, forced: torch.Tensor, allowed: torch.Tensor):
    """Top-k block numbers per row of scores (..., NQB, NKB): forced blocks first, never a
    disallowed one. Returns ascending idx (..., NQB, k) int32 (pad 0) and count int32."""
    s = scores.float().masked_fill(~allowed, float("-inf"))
    s = s.masked_fill(forced & allowed, float("inf"))
    k = min(k, s.shape[-1])
    top = torch.topk(s, k, dim=-1)
    ok = top.values > float("-inf")
    count = ok.sum(-1).to(torch.int32)
    # ascending block order streams K/V forward in memory; padding sorts last
    big = s.shape[-1]
    idx = torch.where(ok, top.indices, big).sort(dim=-1).values
    idx = torch.where(idx == big, 0, idx)
    return idx.to(torch.int32).contiguous(), count.contiguous()


def moba_select(q: torch.Tensor, k: torch.Tensor, block: int, top_k: int):
    """MoBA gating at query-block granularity: affinity(i, j) = mean_{t in block i, h in group}
    q_t,h . mean(k in block j); query block i takes its own block plus the top_k highest past
    blocks (j < i). q (B, Hq, S, D), k (B, Hkv, S, D). Returns idx (B, Hkv, NQB, top_k + 1), count."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    nb = -(-s // block)
    pad = nb * block - s
    ones = torch.ones(s, device=q.device, dtype=torch.float32)
    n_tok = torch.nn.functional.pad(ones, (0, pad)).view(nb, block).sum(-1)  # tokens per block
    with torch.no_grad():
        qf = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(b, hkv, hq // hkv, nb, block, d)
        q_mean = qf.sum(dim=(2, 4)) / (n_tok[:, None] * (hq // hkv))
        kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(b, hkv, nb, block, d)
        k_mean = kf.sum(dim=3) / n_tok[:, None]
        aff = torch.matmul(q_mean, k_mean.transpose(-1, -2))  # (B, Hkv, NQB, NKB)
        i = torch.arange(nb, device=q.device)
        allowed = i[None, :] <= i[:, None]
        forced = i[None, :] == i[:, None]
        return _finish_topk(aff, top_k + 1, forced, allowed)


def cmp_to_select_weights(n_cmp: int, n_sel: int, stride: int, cmp_block: int, sel_block: int, device=None):
    """(n_cmp, n_sel) overlap of compressed key c's span [c*stride, c*stride+cmp_block) with
    selection block j's span, as a fraction of cmp_block (NSA eq. 9 for general geometry)."""
    c0 = torch.arange(n_cmp, device=device)[:, None] * stride
    j0 = torch.arange(n_sel, device=device)[None, :] * sel_block
    overlap = (torch.minimum(c0 + cmp_block, j0 + sel_block) - torch.maximum(c0, j0)).clamp(min=0)
    return overlap.float() / cmp_block


def nsa_select(cmp_scores: torch.Tensor, seq_len: int, sel_block: int, stride: int, cmp_block: int,
               n_select: int, n_local: int = 2):
    """NSA's top-n selection blocks per query block from the compressed-attention importance
    (B, Hkv, NQB, NC). The first block and the n_local most recent blocks are always taken."""
    nqb = cmp_scores.shape[2]
    w = cmp_to_select_weights(cmp_scores.shape[-1], nqb, stride, cmp_block, sel_block, cmp_scores.device)
    scores = torch.matmul(cmp_scores.float(), w)
    i = torch.arange(nqb, device=cmp_scores.device)
    allowed = i[None, :] <= i[:, None]
    forced = (i[None, :] == 0) | ((i[:, None] - i[None, :]) < n_local)
    return _finish_topk(scores, n_select, forced, allowed)


def cmp_scores_reference(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, block: int, stride: int,
                         cmp_block: int, sm_scale: float):
    """Dense torch version of the importance kernel: sum over query block and GQA group of
    softmax(q k_cmp^T) (visible keys only, using the given LSE). Returns (B, Hkv, NQB, NC) fp32."""
    b, hq, s, d = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    sc = torch.matmul(q.float(), k_cmp.float().repeat_interleave(g, 1).transpose(-1, -2)) * sm_scale
    vis = (torch.arange(nc, device=q.device)[None, :] * stride + cmp_block - 1) <= torch.arange(s, device=q.device)[:, None]
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.where(vis, torch.exp(sc - safe_lse[..., None]), 0.0)
    nqb = -(-s // block)
    p = torch.nn.functional.pad(p, (0, 0, 0, nqb * block - s))
    return p.view(b, hkv, g, nqb, block, nc).sum(dim=(2, 4))


@triton.jit
def _cmp_scores_kernel(
    Q, KC, LSE, OUT, sqz, sqh, sqs, skz, skh, sks, slz, slh, soz, soh, som,
    seq_len, n_cmp, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
    STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr = "ieee",
):
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    z = (pid // HKV).to(tl.int64)
    hkv = pid % HKV
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < seq_len
    out_base = OUT + z * soz + hkv * soh + pid_m * som
    # compressed keys visible to the last query of the block: c*STRIDE + CMP_BLOCK - 1 <= last
    last = tl.minimum(pid_m * BLOCK + BLOCK, seq_len) - 1
    n_vis = tl.minimum(tl.maximum((last - (CMP_BLOCK - 1)) // STRIDE + 1, 0), n_cmp)
    for g in range(G):
        h = hkv * G + g
        q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        lse = tl.load(LSE + z * slz + h * slh + offs_m, mask=m_valid, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        for c0 in range(0, n_vis, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_valid = offs_c < n_vis
            kc = tl.load(KC + z * skz + hkv * skh + offs_c[:, None] * sks + offs_d[None, :], mask=c_valid[:, None], other=0.0)
            s = _dot(q, tl.trans(kc), DOT_PRECISION) * qk_scale
            keep = m_valid[:, None] & c_valid[None, :] & ((offs_c * STRIDE + CMP_BLOCK - 1)[None, :] <= offs_m[:, None])
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
            # read-modify-write of this program's own row: deterministic, no atomics
            prev = tl.load(out_base + offs_c, mask=c_valid, other=0.0)
            tl.store(out_base + offs_c, prev + tl.sum(p, 0), mask=c_valid)


def cmp_scores(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, block: int, stride: int,
               cmp_block: int, sm_scale: float):
    """Importance (B, Hkv, NQB, NC) of compressed keys per query block; Triton when usable."""
    if not triton_usable(q, k_cmp, lse) or q.dtype == torch.float64:
        return cmp_scores_reference(q, k_cmp, lse, block, stride, cmp_block, sm_scale)
    b, hq, s, d = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    nqb = -(-s // block)
    out = torch.zeros(b, hkv, nqb, nc, dtype=torch.float32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    k_cmp = k_cmp.contiguous()
    block_c = 64 if nc >= 64 else max(16, triton.next_power_of_2(nc))
    _cmp_scores_kernel[(nqb, b * hkv)](
        q, k_cmp, lse, out, q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), out.stride(2),
        s, nc, sm_scale * 1.4426950408889634,
        HKV=hkv, G=hq // hkv, D=d, BLOCK=block, BLOCK_C=block_c, STRIDE=stride, CMP_BLOCK=cmp_block,
        num_warps=4, num_stages=1 if interpreting() else 2, **fp32_dot_options(),
    )
    return out
