"""Attention options (configs/attention/*.yaml). `kind` selects the registered attention module;
the other fields are read by the kinds that use them."""

from dataclasses import dataclass


@dataclass
class AttentionConfig:
    kind: str = "dense"  # dense | sliding_window | nsa | moba
    block_size: int = 64  # KV / query block for the block-sparse kernels
    window: int = 512  # sliding-window length (sliding_window, and NSA's window branch)
    # NSA (Native Sparse Attention) defaults from the paper
    compress_block: int = 32
    compress_stride: int = 16
    compress_kind: str = "mean"  # mean | learned
    select_block: int = 64
    num_selected: int = 16
    # MoBA
    moba_block: int = 64
    moba_top_k: int = 4
    deterministic_backward: bool = False
