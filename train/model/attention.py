"""Dense causal self-attention with GQA through SDPA.

Sparse attention kinds subclass `SelfAttention` and override `attend` (or `forward` when they
need extra inputs, as NSA's gates do); the projections and RoPE stay here.

Two seams for code outside the model (parallel/context_parallel.py), which keep parallelism out
of it: every `attend` takes `q_offset`, the position of its first query, over the keys of the
whole prefix up to its last query (chunked causal attention); and `core_wrapper`, when set, runs
the core in place of a plain call (the context-parallel K/V all-gather lives there).
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from sparsetron.configs.schema.model import fused_blocks, head_dim_of

from .registry import register_attention
from .rope import apply_rope


class SelfAttention(nn.Module):
    q_offset_multiple = 1  # attend's q_offset must be a multiple of this (sparse kinds: their block size)

    def __init__(self, cfg, attn_cfg=None, layer_idx: int = 0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = head_dim_of(cfg)  # model.head_dim, else dim // n_heads
        self.layer_idx = layer_idx
        self.attn_cfg = attn_cfg
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.fused = fused_blocks(cfg)
        self.checkpoint_core = False  # set by the activation-checkpointing policy "attention"
        # core_wrapper(fn, q, k, v, *per_query) replaces fn(q, k, v, *per_query) when set (context parallel)
        self.core_wrapper = None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Project and rotate. Returns q (B, Hq, S, D), k and v (B, Hkv, S, D)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        if self.fused:
            from sparsetron.kernels.rope import apply_rope_qk

            q, k = apply_rope_qk(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        """Causal attention core: q (B, Hq, Sq, D) at positions q_offset .. q_offset + Sq - 1, k and v
        (B, Hkv, q_offset + Sq, D) at positions 0 .. q_offset + Sq - 1 -> (B, Hq, Sq, D)."""
        gqa = self.n_heads != self.n_kv_heads
        if q_offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        check_prefix(q, k, q_offset, self.q_offset_multiple)
        # the causal diagonal aligned to the last key (flash attention takes it on the GPU)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right(q.shape[2], k.shape[2]), enable_gqa=gqa)

    def run_core(self, fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *per_query: torch.Tensor):
        """fn(q, k, v, *per_query) (per_query: tensors laid out like q along the sequence, dim 2), through
        `core_wrapper` when set, under activation checkpointing when the policy asks for it."""
        if self.core_wrapper is not None:
            fn = functools.partial(self.core_wrapper, fn)
        if self.checkpoint_core and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, q, k, v, *per_query, use_reentrant=False)
        return fn(q, k, v, *per_query)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        o = self.run_core(self.attend, q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


# one CausalBias per shape, made once: a tensor subclass made again inside a selective-checkpoint
# recompute fails (the recompute hands back the first forward's raw tensor)
_lower_right = functools.lru_cache(maxsize=64)(causal_lower_right)


def check_prefix(q: torch.Tensor, k: torch.Tensor, q_offset: int, multiple: int) -> None:
    """Queries at q_offset.. need the keys of positions 0 .. q_offset + Sq - 1, and an offset on the
    block grid of the block lists."""
    if q_offset < 0 or q_offset % multiple or k.shape[2] != q_offset + q.shape[2]:
        raise ValueError(f"q_offset={q_offset} must be >= 0 and a multiple of {multiple}, with keys for positions "
                         f"0 .. q_offset + Sq - 1 (got {k.shape[2]} keys for Sq={q.shape[2]})")


@register_attention("dense")
def _dense(cfg, attn_cfg, layer_idx):
    return SelfAttention(cfg, attn_cfg, layer_idx)
