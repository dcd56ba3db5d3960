import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.configs.schema.model import fused_blocks

from .registry import register_mlp


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the Llama MLP."""

    def __init__(self, dim: int, ffn_dim: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # silu and the product in one pass; backward recomputes silu
            from sparsetron.kernels.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@register_mlp("swiglu")
def _dense(cfg, moe_cfg, layer_idx):
    return SwiGLU(cfg.dim, cfg.ffn_dim, fused_blocks(cfg))
