"""Mixture of Block Attention (Lu et al., 2025) and sliding-window attention on the block-sparse
core.

MoBA: every query block attends its own block (causally) plus the `moba_top_k` past KV blocks with
the highest affinity mean(q in the block, over the GQA group) . mean(k in the KV block). Gating is
per query block and KV head (MoBA gates per token; one list per block keeps whole tiles dense).
Small blocks (16, 32) are supported, which is where FlashMoBA finds MoBA's quality.
"""

from sparsetron.kernels.sparse_attention.function import sparse_attention_core
from sparsetron.kernels.sparse_attention.reference import reference_block_sparse_attention
from sparsetron.kernels.sparse_attention.selection import moba_select, window_block_lists
from sparsetron.train.model.attention import SelfAttention

from .nsa import _field, check_block, check_positive


class MoBAAttention(SelfAttention):
    def __init__(self, cfg, attn_cfg=None, layer_idx: int = 0):
        super().__init__(cfg, attn_cfg, layer_idx)
        self.block = check_block("moba_block", _field(attn_cfg, "moba_block", 64))
        self.top_k = check_positive("moba_top_k", _field(attn_cfg, "moba_top_k", 4))
        self.deterministic = bool(_field(attn_cfg, "deterministic_backward", False))
        self.use_reference = False

    def select(self, q, k):
        return moba_select(q, k, self.block, self.top_k)

    def attend(self, q, k, v):
        idx, cnt = self.select(q, k)
        if self.use_reference:
            return reference_block_sparse_attention(q, k, v, idx, cnt, self.block)[0]
        return sparse_attention_core(q, k, v, idx, cnt, self.block, deterministic=self.deterministic)[0]


class SlidingWindowAttention(SelfAttention):
    """Causal attention to the last `window` tokens (exact per token, block lists of `block_size`)."""

    def __init__(self, cfg, attn_cfg=None, layer_idx: int = 0):
        super().__init__(cfg, attn_cfg, layer_idx)
        self.block = check_block("block_size", _field(attn_cfg, "block_size", 64))
        self.window = check_positive("window", _field(attn_cfg, "window", 512))
        self.deterministic = bool(_field(attn_cfg, "deterministic_backward", False))
        self.use_reference = False

    def attend(self, q, k, v):
        idx, cnt = window_block_lists(q.shape[2], self.block, self.window, q.device)
        idx = idx.expand(q.shape[0], self.n_kv_heads, -1, -1)
        cnt = cnt.expand(q.shape[0], self.n_kv_heads, -1)
        if self.use_reference:
            return reference_block_sparse_attention(q, k, v, idx, cnt, self.block, window=self.window)[0]
        return sparse_attention_core(q, k, v, idx, cnt, self.block, window=self.window,
                                     deterministic=self.deterministic)[0]
