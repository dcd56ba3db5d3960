"""MoEMLP: the Mixture-of-Experts MLP the Llama block picks with model.mlp == "moe".

Router (router.py) -> expert MLPs (Triton kernels on GPU / under the interpreter, per-expert loop
otherwise; function.py) -> optional shared expert. With ``ep_group`` set, experts are sharded over
that group and tokens move by all-to-all (expert_parallel.py).

After every forward: ``self.aux_loss`` (scalar tensor or None; the model adds it to the loss) and
``self.last_stats`` (detached tensors: expert_load, tokens_dropped, tokens_added,
experts_per_token, and balance_loss / z_loss / expert_bias when those are on;
dropped_assignment_fraction / dropped_token_fraction with moe.capacity_factor > 0). Under expert
parallel the capacity counts the tokens of this rank (each rank routes its own batch, as GShard's
per-group capacity does).
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from sparsetron.kernels.moe.function import IMPLEMENTATIONS, moe_experts, resolve_implementation
from sparsetron.train.model.mlp import SwiGLU
from sparsetron.train.model.registry import register_mlp

from .expert_parallel import ep_moe_experts
from .router import Router


def autocast_expert_inputs(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """Under autocast, cast the expert inputs as F.linear would: autograd Functions and
    torch._grouped_mm are not autocast ops, so fp32 master weights and an fp32 residual stream
    would otherwise run the expert GEMMs in fp32 (and send fp32 rows through the EP all-to-all)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, w1, w2
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), w1.to(dt), w2.to(dt)


class StackedExpertWeight(nn.Module):
    """One (E, out, in) parameter named ``weight``: keeps Llama's init rules (``down_proj.weight``
    gets the scaled residual init) and reads like nn.Linear per expert."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        nn.init.normal_(self.weight, 0.0, in_features**-0.5)


class MoEMLP(nn.Module):
    def __init__(self, dim: int, moe_cfg, ep_group=None):
        super().__init__()
        e, k, f = moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.expert_ffn_dim
        if e < 1 or f < 1:
            raise ValueError(f"moe.num_experts and moe.expert_ffn_dim must be >= 1, got {e}, {f}")
        implementation = getattr(moe_cfg, "implementation", "auto")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"moe.implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.num_experts, self.implementation = e, implementation
        self.router = Router(
            dim, e, k,
            score_func=moe_cfg.score_func,
            load_balancing=moe_cfg.load_balancing,
            aux_loss_coef=moe_cfg.aux_loss_coef,
            z_loss_coef=moe_cfg.z_loss_coef,
            bias_lr=moe_cfg.aux_free_bias_lr,
            token_rounding=moe_cfg.token_rounding,
            tile_m=moe_cfg.tile_m,
            norm_topk_prob=getattr(moe_cfg, "norm_topk_prob", None),
            capacity_factor=getattr(moe_cfg, "capacity_factor", 0.0),
        )
        self.gate_up_proj = StackedExpertWeight(e, 2 * f, dim)  # rows [0, F) gate, [F, 2F) up
        self.down_proj = StackedExpertWeight(e, dim, f)
        shared = getattr(moe_cfg, "shared_expert_ffn_dim", 0)
        self.shared_expert = SwiGLU(dim, shared) if shared > 0 else None
        self.ep_group = None
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_stats: dict = {}
        if ep_group is not None:
            self.set_ep_group(ep_group)

    @property
    def ep_world(self) -> int:
        return 1 if self.ep_group is None else dist.get_world_size(self.ep_group)

    def set_ep_group(self, group) -> None:
        """Shard the experts over ``group``: rank r keeps experts [r * E/P, (r + 1) * E/P).
        Parameters keep their identity (only .data shrinks), so call it before the optimizer has
        state; the model's init must be identical on all ranks (same seed)."""
        self.ep_group = group
        self._shard_experts()

    def _shard_experts(self) -> None:
        world = self.ep_world
        if self.gate_up_proj.weight.shape[0] != self.num_experts:
            return  # already sharded
        if self.num_experts % world:
            raise ValueError(f"moe.num_experts={self.num_experts} must divide by the ep group size {world}")
        per = self.num_experts // world
        lo = dist.get_rank(self.ep_group) * per
        for p in (self.gate_up_proj.weight, self.down_proj.weight):
            p.data = p.data[lo : lo + per].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        routing, aux, stats = self.router(x2)
        x2, w1, w2 = autocast_expert_inputs(x2, self.gate_up_proj.weight, self.down_proj.weight)
        impl = resolve_implementation(self.implementation, x2, w1, w2)

        def local(xs, a, b, r):
            return moe_experts(xs, a, b, r, impl)

        if self.ep_group is not None and self.ep_world > 1:
            self._shard_experts()  # ep_group may have been assigned as a plain attribute
            y = ep_moe_experts(x2, w1, w2, routing, self.ep_group, local)
        else:
            y = local(x2, w1, w2, routing)
        y = y.reshape(shape)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        self.aux_loss, self.last_stats = aux, stats
        return y


@register_mlp("moe")
def _moe(model_cfg, moe_cfg, layer_idx):
    if moe_cfg is None:
        raise ValueError("model.mlp='moe' needs a moe config (MoEConfig)")
    return MoEMLP(model_cfg.dim, moe_cfg)
