"""Native Sparse Attention (Yuan et al., 2025) on the block-sparse core.

Three branches per query head, mixed by per-token, per-head sigmoid gates computed from the
layer input:
  compressed: keys/values of each span of `compress_block` tokens (stride `compress_stride`)
    pooled into one token (mean, or learned per-position weights); a query sees the compressed
    tokens whose span ended at or before it;
  selected: the `num_selected` blocks of `select_block` tokens with the highest compressed
    attention probability (summed over the query block and the GQA group, so one list per KV
    head and query block), always including the first block and the 2 most recent;
  window: the last `window` tokens.
Selection is at query-block granularity (one list per block of select_block queries) rather than
per token: that is what lets the selected branch run as dense tiles on the block-sparse kernel.

Queries starting at q_offset > 0 (context parallel's chunks; a multiple of both block sizes) take
the keys of the whole prefix: the compressed keys are pooled over the prefix, block lists count
blocks from position 0, and every key position is shifted by -q_offset for the kernels (their
masks compare a key's position with the query's position counted from the first query).
"""

import torch
from torch import nn

from sparsetron.kernels.sparse_attention.function import ALLOWED_BLOCKS, sparse_attention_core
from sparsetron.kernels.sparse_attention.reference import reference_block_sparse_attention
from sparsetron.kernels.sparse_attention.selection import (
    _finish_topk,
    cmp_scores,
    cmp_scores_reference,
    cmp_to_select_weights,
    compressed_block_lists,
    nsa_select,
    window_block_lists,
)
from sparsetron.train.model.attention import SelfAttention, check_prefix

COMPRESS_KINDS = ("mean", "learned")


def _field(cfg, name, default):
    return getattr(cfg, name, default) if cfg is not None else default


def check_block(name: str, value: int) -> int:
    if value not in ALLOWED_BLOCKS:
        raise ValueError(f"attention.{name} must be one of {ALLOWED_BLOCKS}, got {value}")
    return value


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"attention.{name} must be a positive integer, got {value!r}")
    return value


class NSAAttention(SelfAttention):
    def __init__(self, cfg, attn_cfg=None, layer_idx: int = 0):
        super().__init__(cfg, attn_cfg, layer_idx)
        self.block = check_block("block_size", _field(attn_cfg, "block_size", 64))
        self.window = check_positive("window", _field(attn_cfg, "window", 512))
        self.cmp_block = check_positive("compress_block", _field(attn_cfg, "compress_block", 32))
        self.cmp_stride = check_positive("compress_stride", _field(attn_cfg, "compress_stride", 16))
        if self.cmp_stride > self.cmp_block:
            raise ValueError(f"attention.compress_stride ({self.cmp_stride}) must be <= compress_block ({self.cmp_block})")
        self.cmp_kind = _field(attn_cfg, "compress_kind", "mean")
        if self.cmp_kind not in COMPRESS_KINDS:
            raise ValueError(f"attention.compress_kind must be one of {COMPRESS_KINDS}, got {self.cmp_kind!r}")
        self.sel_block = check_block("select_block", _field(attn_cfg, "select_block", 64))
        self.n_select = check_positive("num_selected", _field(attn_cfg, "num_selected", 16))
        self.deterministic = bool(_field(attn_cfg, "deterministic_backward", False))
        self.gate_proj = nn.Linear(cfg.dim, 3 * self.n_heads, bias=False)
        if self.cmp_kind == "learned":
            # weight = (1 + delta) / cmp_block: starts at mean pooling whatever init delta gets
            self.k_compress = nn.Parameter(torch.zeros(self.n_kv_heads, self.cmp_block))
            self.v_compress = nn.Parameter(torch.zeros(self.n_kv_heads, self.cmp_block))
        self.use_reference = False  # run every piece in plain PyTorch (tests, debugging)
        self.q_offset_multiple = max(self.block, self.sel_block)  # both powers of two

    def compress(self, k: torch.Tensor, v: torch.Tensor):
        """(B, Hkv, S, D) -> (B, Hkv, NC, D) with NC = (S - cmp_block) // stride + 1 (0 if S short)."""
        if k.shape[2] < self.cmp_block:
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
            return empty, empty
        kw = k.unfold(2, self.cmp_block, self.cmp_stride)  # (B, Hkv, NC, D, cmp_block)
        vw = v.unfold(2, self.cmp_block, self.cmp_stride)
        if self.cmp_kind == "mean":
            return kw.mean(-1), vw.mean(-1)
        wk = ((1 + self.k_compress) / self.cmp_block).to(k.dtype)
        wv = ((1 + self.v_compress) / self.cmp_block).to(v.dtype)
        return torch.einsum("bhcdp,hp->bhcd", kw, wk), torch.einsum("bhcdp,hp->bhcd", vw, wv)

    def _core(self, q, k, v, idx, cnt, block, **kw):
        if self.use_reference:
            return reference_block_sparse_attention(q, k, v, idx, cnt, block, **kw)
        return sparse_attention_core(q, k, v, idx, cnt, block, deterministic=self.deterministic, **kw)

    def branches(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0):
        """(o_cmp, o_slc, o_win, selected idx, count); each output (B, Hq, Sq, D). Queries sit at
        positions q_offset.., keys at 0 .. q_offset + Sq - 1 (see SelfAttention.attend)."""
        if q_offset:
            check_prefix(q, k, q_offset, self.q_offset_multiple)
        s = q.shape[2]
        end = q_offset + s  # positions the keys cover
        first = q_offset // self.sel_block  # query blocks of the prefix: their lists are dropped
        scale = self.head_dim ** -0.5
        k_cmp, v_cmp = self.compress(k, v)
        n_cmp = k_cmp.shape[2]
        # compressed key c ends at c*stride + cmp_block - 1; the kernels count positions from the first query
        key_end = self.cmp_block - q_offset
        key_place = dict(key_stride=self.cmp_stride, key_offset=key_end - 1, sm_scale=scale)
        if n_cmp > 0:
            c_idx, c_cnt = compressed_block_lists(end, n_cmp, self.sel_block, self.cmp_stride, self.cmp_block, q.device)
            c_idx = c_idx[:, :, first:].expand(q.shape[0], self.n_kv_heads, -1, -1)
            c_cnt = c_cnt[:, :, first:].expand(q.shape[0], self.n_kv_heads, -1)
            o_cmp, lse_cmp = self._core(q, k_cmp, v_cmp, c_idx, c_cnt, self.sel_block, **key_place)
            with torch.no_grad():
                score_fn = cmp_scores_reference if self.use_reference else cmp_scores
                imp = score_fn(q.detach(), k_cmp.detach(), lse_cmp, self.sel_block, self.cmp_stride, key_end, scale)
        else:
            o_cmp = torch.zeros_like(q)
            imp = q.new_zeros(q.shape[0], self.n_kv_heads, -(-s // self.sel_block), 1, dtype=torch.float32)
        if q_offset == 0:
            idx, cnt = nsa_select(imp, s, self.sel_block, self.cmp_stride, self.cmp_block, self.n_select)
        else:
            idx, cnt = nsa_select_at(imp, first, -(-end // self.sel_block), self.sel_block, self.cmp_stride,
                                     self.cmp_block, self.n_select)
        o_slc, _ = self._core(q, k, v, idx, cnt, self.sel_block, sm_scale=scale, key_offset=-q_offset)
        w_idx, w_cnt = window_block_lists(end, self.block, self.window, q.device)
        w_idx = w_idx[:, :, q_offset // self.block:].expand(q.shape[0], self.n_kv_heads, -1, -1)
        w_cnt = w_cnt[:, :, q_offset // self.block:].expand(q.shape[0], self.n_kv_heads, -1)
        o_win, _ = self._core(q, k, v, w_idx, w_cnt, self.block, window=self.window, sm_scale=scale,
                              key_offset=-q_offset)
        return o_cmp, o_slc, o_win, idx, cnt

    def attend_gated(self, q, k, v, gates, q_offset: int = 0):
        """gates (B, Hq, Sq, 3) in [0, 1]."""
        o_cmp, o_slc, o_win, _, _ = self.branches(q, k, v, q_offset)
        g = gates.to(q.dtype)
        return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        gates = torch.sigmoid(self.gate_proj(x).float()).view(b, s, self.n_heads, 3).transpose(1, 2)
        o = self.run_core(self.attend_gated, q, k, v, gates)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))

    def attend(self, q, k, v, q_offset: int = 0):
        """Ungated use (all gates 1), for callers that only have q, k, v."""
        o_cmp, o_slc, o_win, _, _ = self.branches(q, k, v, q_offset)
        return o_cmp + o_slc + o_win


def nsa_select_at(imp: torch.Tensor, first_block: int, n_kv_blocks: int, sel_block: int, stride: int,
                  cmp_block: int, n_select: int, n_local: int = 2):
    """`nsa_select` for query blocks first_block .. first_block + NQB - 1 of the keys' grid, choosing
    among the n_kv_blocks selection blocks of the prefix (imp: (B, Hkv, NQB, NC) for those blocks)."""
    w = cmp_to_select_weights(imp.shape[-1], n_kv_blocks, stride, cmp_block, sel_block, imp.device)
    scores = torch.matmul(imp.float(), w)
    i = first_block + torch.arange(imp.shape[2], device=imp.device)[:, None]
    j = torch.arange(n_kv_blocks, device=imp.device)[None, :]
    return _finish_topk(scores, n_select, (j == 0) | ((i - j) < n_local), j <= i)
