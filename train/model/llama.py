"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, SwiGLU (or a registered MLP such as
MoE), GQA attention through SDPA (or a registered sparse attention). No parallelism in here:
`sparsetron.parallel` wraps or rewrites the modules from outside."""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as _attention  # noqa: F401  (registers "dense")
from . import mlp as _mlp  # noqa: F401  (registers "swiglu")
from sparsetron.configs.schema.model import fused_blocks, fused_loss

from .checkpointing import apply_policy, run_block
from .norm import RMSNorm
from .registry import get_attention, get_mlp
from .rope import model_rope_tables


class Block(nn.Module):
    def __init__(self, cfg, attn_cfg, moe_cfg, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = get_attention(getattr(attn_cfg, "kind", "dense"))(cfg, attn_cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = get_mlp(cfg.mlp)(cfg, moe_cfg, layer_idx)
        self.fused = fused_blocks(cfg)
        self.checkpoint = "none"  # block-level policy (selective | full), set by checkpointing.apply_policy
        self.checkpoint_context_fn = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # checkpointing happens in here, so that a compiled block (block.compile()) traces it too
        return run_block(self.layer, self.checkpoint, x, cos, sin, context_fn=self.checkpoint_context_fn)

    def layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.fused:  # one kernel for "residual add + norm" instead of two passes over x
            from sparsetron.kernels.rmsnorm import rms_norm

            a = self.attn(rms_norm(x, self.attn_norm.weight, self.attn_norm.eps), cos, sin)
            y, x = rms_norm(a, self.mlp_norm.weight, self.mlp_norm.eps, residual=x)
            return x + self.mlp(y)
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg, attn_cfg=None, moe_cfg=None):
        super().__init__()
        if (not getattr(cfg, "head_dim", None) and cfg.dim % cfg.n_heads) or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError("model.dim must divide by model.n_heads (or set model.head_dim), and n_heads by n_kv_heads")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attn_cfg, moe_cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = model_rope_tables(cfg)  # rope_theta, head_dim and the rope_* scaling (rope.py)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        apply_policy(self, cfg.activation_checkpointing)  # none | attention | selective | full
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # GPT-2 / Megatron habit: residual output projections scaled by 1/sqrt(2 * n_layers)
        out_std = std / (2 * self.cfg.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the auxiliary losses (MoE load balancing, ...) set by the last forward."""
        losses = [m.aux_loss for m in self.modules() if m is not self and getattr(m, "aux_loss", None) is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def rope_tables(self, s: int):
        """cos, sin (s, head_dim / 2) of the positions of a forward's s tokens: 0 .. s-1 (context
        parallel rebinds this on the instance to the global positions of its sequence shard)."""
        return self.rope_cos[:s], self.rope_sin[:s]

    def hidden(self, tokens: torch.Tensor, hidden_states: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Final normed hidden states (B, S, dim); appends each block's output to hidden_states."""
        s = tokens.shape[1]
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s} > model.max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_tables(s)
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, output_hidden_states: bool = False):
        """Logits (B, S, V) without targets; with targets, the mean next-token cross-entropy (the
        trainer adds `aux_loss()`). With output_hidden_states, returns (result, [block outputs])."""
        hidden_states: Optional[List[torch.Tensor]] = [] if output_hidden_states else None
        h = self.hidden(tokens, hidden_states)
        if targets is None:
            out = self.head(h)
        elif fused_loss(self.cfg):  # chunked: the (tokens, vocab) logits never exist in full
            from sparsetron.kernels.linear_cross_entropy import linear_cross_entropy

            out = linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten(), ignore_index=-100)
        else:
            out = F.cross_entropy(self.head(h).float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return (out, hidden_states) if output_hidden_states else out
