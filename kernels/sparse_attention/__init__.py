"""Trainable block-sparse attention (Triton): the block-sparse core and the block selection ops.
The NSA / MoBA / sliding-window layers that use it live in sparsetron.train.model.sparse_attention.

    from sparsetron.kernels.sparse_attention import block_sparse_attention
    out = block_sparse_attention(q, k, v, block_idx, block_count, block_size=64)
"""

from .function import block_sparse_attention, sparse_attention_core
from .reference import block_lists_to_mask, reference_block_sparse_attention

__all__ = ["block_sparse_attention", "sparse_attention_core", "block_lists_to_mask", "reference_block_sparse_attention"]
