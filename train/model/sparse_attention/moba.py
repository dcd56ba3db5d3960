"""Mixture of Block Attention (Lu et al., 2025) and sliding-window attention on the block-sparse
core.

MoBA: every query block attends its own block (causally) plus the `moba_top_k` past KV blocks with
the highest affinity mean(q in the block, over the GQA group) . mean(k in the KV block). Gating is
per query block and KV head (MoBA gates per token; one list per block keeps whole tiles dense).
Small blocks (16, 32) are supported, which is where FlashMoBA finds MoBA's quality.

Queries that start at a block boundary q_offset > 0 (context parallel's sequence chunks) attend the
keys of the whole prefix: block lists count KV blocks from position 0, and the kernel places key n
at n - q_offset relative to the first query (key_offset), which keeps its causal/window masks exact.
"""

import torch

from sparsetron.kernels.sparse_attention.function import sparse_attention_core
from sparsetron.kernels.sparse_attention.reference import reference_block_sparse_attention
from sparsetron.kernels.sparse_attention.selection import _finish_topk, moba_select, window_block_lists
from sparsetron.train.model.attention import SelfAttention, check_prefix

from .nsa import _field, check_block, check_positive


class MoBAAttention(SelfAttention):
    def __init__(self, cfg, attn_cfg=None, layer_idx: int = 0):
        super().__init__(cfg, attn_cfg, layer_idx)
        self.block = check_block("moba_block", _field(attn_cfg, "moba_block", 64))
        self.top_k = check_positive("moba_top_k", _field(attn_cfg, "moba_top_k", 4))
        self.deterministic = bool(_field(attn_cfg, "deterministic_backward", False))
        self.use_reference = False
        self.q_offset_multiple = self.block

    def select(self, q, k, q_offset: int = 0):
        if q_offset == 0:
            return moba_select(q, k, self.block, self.top_k)
        return moba_select_at(q, k, self.block, self.top_k, q_offset // self.block)

    def attend(self, q, k, v, q_offset: int = 0):
        if q_offset:
            check_prefix(q, k, q_offset, self.block)
        idx, cnt = self.select(q, k, q_offset)
        if self.use_reference:
            return reference_block_sparse_attention(q, k, v, idx, cnt, self.block, key_offset=-q_offset)[0]
        return sparse_attention_core(q, k, v, idx, cnt, self.block, key_offset=-q_offset,
                                     deterministic=self.deterministic)[0]


class SlidingWindowAttention(SelfAttention):
    """Causal attention to the last `window` tokens (exact per token, block lists of `block_size`)."""

    def __init__(self, cfg, attn_cfg=None, layer_idx: int = 0):
        super().__init__(cfg, attn_cfg, layer_idx)
        self.block = check_block("block_size", _field(attn_cfg, "block_size", 64))
        self.window = check_positive("window", _field(attn_cfg, "window", 512))
        self.deterministic = bool(_field(attn_cfg, "deterministic_backward", False))
        self.use_reference = False
        self.q_offset_multiple = self.block

    def attend(self, q, k, v, q_offset: int = 0):
        if q_offset:
            check_prefix(q, k, q_offset, self.block)
        idx, cnt = window_block_lists(q_offset + q.shape[2], self.block, self.window, q.device)
        first = q_offset // self.block  # the lists of the prefix's query blocks are not needed
        idx = idx[:, :, first:].expand(q.shape[0], self.n_kv_heads, -1, -1)
        cnt = cnt[:, :, first:].expand(q.shape[0], self.n_kv_heads, -1)
        if self.use_reference:
            return reference_block_sparse_attention(q, k, v, idx, cnt, self.block, window=self.window,
                                                    key_offset=-q_offset)[0]
        return sparse_attention_core(q, k, v, idx, cnt, self.block, window=self.window, key_offset=-q_offset,
                                     deterministic=self.deterministic)[0]


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., S, D) -> (..., ceil(S / block), D): the mean of each block's rows (a ragged last block
    averages the rows it has), in fp32."""
    s = x.shape[-2]
    nb = -(-s // block)
    pad = nb * block - s
    n_tok = torch.nn.functional.pad(torch.ones(s, device=x.device), (0, pad)).view(nb, block).sum(-1)
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(*x.shape[:-2], nb, block, x.shape[-1]).sum(-2)
    return sums / n_tok[:, None]


def moba_select_at(q: torch.Tensor, k: torch.Tensor, block: int, top_k: int, first_block: int):
    """`moba_select` for queries whose first block is block `first_block` of the keys' grid: k holds
    the keys of every position up to the last query. q (B, Hq, Sq, D), k (B, Hkv, Sk, D); returns idx
    (B, Hkv, NQB, <= top_k + 1) with KV block numbers counted from position 0, and count."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    with torch.no_grad():
        q_mean = _block_means(q, block).view(b, hkv, hq // hkv, -1, d).mean(2)  # over the GQA group
        aff = torch.matmul(q_mean, _block_means(k, block).transpose(-1, -2))  # (B, Hkv, NQB, NKB)
        i = first_block + torch.arange(aff.shape[2], device=q.device)[:, None]
        j = torch.arange(aff.shape[3], device=q.device)[None, :]
        return _finish_topk(aff, top_k + 1, j == i, j <= i)
