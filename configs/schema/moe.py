"""Mixture-of-Experts options (configs/moe/*.yaml); used when model.mlp == "moe"."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_dim: int = 256
    score_func: str = "softmax"  # softmax | sigmoid
    shared_expert_ffn_dim: int = 0  # 0 = no shared expert
    load_balancing: str = "aux_loss"  # aux_loss | aux_free | none
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    aux_free_bias_lr: float = 0.001  # DeepSeek-V3 per-expert bias update speed
    token_rounding: bool = False  # SonicMoE: round per-expert counts to tile_m multiples
    tile_m: int = 128
    norm_topk_prob: Optional[bool] = None  # renormalise the top-k weights; None: yes unless softmax with k=1
    implementation: str = "auto"  # auto | triton | torch (reference) | grouped_mm (argsort + torch._grouped_mm)
    # GShard/Switch token dropping: each expert keeps its best-scored ceil(capacity_factor * T * k / E)
    # assignments, the rest pass through the residual. 0 = off. Exclusive with token_rounding.
    capacity_factor: float = 0.0


def check_moe_fields(m, error) -> None:
    """Capacity-factor checks; `error(field, message)` builds the exception (ConfigError)."""
    if not m.capacity_factor >= 0:  # also refuses NaN
        raise error("moe.capacity_factor", f"got {m.capacity_factor}, must be >= 0 (0 = no token dropping)")
    if m.capacity_factor > 0 and m.token_rounding:
        raise error("moe.capacity_factor", f"got {m.capacity_factor} with moe.token_rounding=true: both set the "
                    "per-expert counts (capacity caps them, rounding snaps them to moe.tile_m); set "
                    "moe.capacity_factor=0 or moe.token_rounding=false")
