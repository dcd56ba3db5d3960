"""Dense causal self-attention with GQA through SDPA.

Sparse attention kinds subclass `SelfAttention` and override `attend` (or `forward` when they
need extra inputs, as NSA's gates do); the projections and RoPE stay here.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.configs.schema.model import fused_blocks, head_dim_of

from .registry import register_attention
from .rope import apply_rope


class SelfAttention(nn.Module):
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention core: (B, Hq, S, D), (B, Hkv, S, D) x2 -> (B, Hq, S, D)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if self.checkpoint_core and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            o = checkpoint(self.attend, q, k, v, use_reentrant=False)
        else:
            o = self.attend(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


@register_attention("dense")
def _dense(cfg, attn_cfg, layer_idx):
    return SelfAttention(cfg, attn_cfg, layer_idx)
