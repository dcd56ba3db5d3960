"""Router: linear gate -> softmax/sigmoid scores -> top-k -> (optional) SonicMoE token rounding.

Load balancing is a config choice:
  * "aux_loss": Switch-Transformer loss  coef * E * sum_e f_e * P_e  (f_e = share of assignments,
    P_e = mean routing probability), differentiable through P_e.
  * "aux_free": DeepSeek-V3 per-expert bias added to the scores for *selection only*; after each
    training forward the bias moves by ``bias_lr * sign(mean_load - load_e)``.
  * "none".
The router z-loss  coef * mean(logsumexp(logits)^2)  is added whenever z_loss_coef > 0.
Capacity factor (GShard / Switch token dropping): with capacity_factor > 0 every expert keeps at
most ceil(capacity_factor * T * k / E) of the assignments that chose it, the best by router score;
the rest are dropped (see capacity_mask).
Routing runs in fp32 with tensor ops only (no host loop over experts). With token rounding the plan
comes from kernels/moe/fused_routing (Triton, no device-to-host sync) and is padded to a static size:
its real row count is routing.expert_offsets[-1] (routing.compact() trims it, with one sync).
"""

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from sparsetron.kernels.moe.fused_routing import route_tokens
from sparsetron.kernels.moe.routing import Routing, routing_from_mask, routing_from_topk
from sparsetron.kernels.moe.token_rounding import priority_key

SCORE_FUNCS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "aux_free", "none")
ROUTING_IMPLEMENTATIONS = ("auto", "triton", "torch")


class _FP32Logits(torch.autograd.Function):
    """logits = x @ w^T in fp32 while keeping only x in its own dtype for backward: the fp32 copy of
    x that F.linear(x.float(), ...) would save costs 4*dim bytes per token (SonicMoE's point:
    cache only what backward needs)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):  # fp32 logits also under bf16 autocast
            return x.float() @ w.float().t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx = (g.float() @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = (g.float().t() @ x.float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """GShard/Switch capacity: ceil(capacity_factor * T * k / E) assignments per expert. Rounded to
    9 decimals first so float noise (1.1 * 10 = 11.000000000000002) does not add a slot. Host
    arithmetic on shapes only: no device sync."""
    return math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))


def capacity_mask(score: torch.Tensor, topk_mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """(T, E) mask of the assignments that survive: per expert, the ``capacity`` best-scored of the
    tokens that selected it (ties: the lower token index wins); the rest of topk_mask is dropped.

    One top-``capacity`` over the (E, T) matrix of int64 keys: the score's float bits made
    order-preserving in the high 32 bits and the reversed token index in the low 32, so every key
    of an expert row is distinct and the kept set does not depend on how topk breaks ties.
    Unselected pairs get the lowest key; if one is picked (fewer than ``capacity`` selected) the
    gather from topk_mask keeps it off."""
    t, e = score.shape
    if capacity >= t:  # no expert can hold more than T tokens: nothing to drop
        return topk_mask
    sel = topk_mask.t()
    key = torch.where(sel, priority_key(score), torch.iinfo(torch.int64).min)
    best = torch.topk(key, capacity, dim=1).indices  # (E, capacity)
    keep = torch.zeros_like(sel).scatter_(1, best, sel.gather(1, best))
    return keep.t()


class Router(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        load_balancing: str = "aux_loss",
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        bias_lr: float = 0.001,
        token_rounding: bool = False,
        tile_m: int = 128,
        norm_topk_prob: Optional[bool] = None,
        capacity_factor: float = 0.0,
        routing_implementation: str = "auto",
    ):
        """routing_implementation: how a token-rounded plan is built -- "auto" (Triton where usable),
        "triton" or "torch" (the PyTorch reference: same plan, with host syncs); for tests and benchmarks."""
        super().__init__()
        if routing_implementation not in ROUTING_IMPLEMENTATIONS:
            raise ValueError(f"routing_implementation must be one of {ROUTING_IMPLEMENTATIONS}, got {routing_implementation!r}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"moe.score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if load_balancing not in LOAD_BALANCING:
            raise ValueError(f"moe.load_balancing must be one of {LOAD_BALANCING}, got {load_balancing!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe.top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if tile_m < 1:
            raise ValueError(f"moe.tile_m must be >= 1, got {tile_m}")
        if not capacity_factor >= 0:  # also refuses NaN
            raise ValueError(f"moe.capacity_factor must be >= 0 (0 = no token dropping), got {capacity_factor}")
        if capacity_factor > 0 and token_rounding:
            raise ValueError("moe.capacity_factor > 0 and moe.token_rounding=true are exclusive: both move "
                             "per-expert counts (capacity caps them, rounding snaps them to tile_m); pick one")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.load_balancing = score_func, load_balancing
        self.aux_loss_coef, self.z_loss_coef, self.bias_lr = aux_loss_coef, z_loss_coef, bias_lr
        self.token_rounding, self.tile_m = token_rounding, tile_m
        self.capacity_factor = float(capacity_factor)
        self.routing_implementation = routing_implementation
        # Renormalising the k weights of one expert (k=1 softmax) would make them all 1 and cut the
        # router off from the main loss, so that case defaults to raw probabilities.
        if norm_topk_prob is None:
            norm_topk_prob = score_func == "sigmoid" or top_k > 1
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, 0.0, dim**-0.5)
        # A buffer, not a parameter: it is moved by the load rule, never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> Tuple[Routing, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """x: (T, dim) -> (routing plan, aux loss or None, detached stats for logging)."""
        t, e, k = x.shape[0], self.num_experts, self.top_k
        logits = _FP32Logits.apply(x, self.weight)
        scores = torch.softmax(logits, -1) if self.score_func == "softmax" else torch.sigmoid(logits)
        select = scores + self.expert_bias if self.load_balancing == "aux_free" else scores
        topk_idx = torch.topk(select.detach(), k, dim=-1).indices
        topk_w = scores.gather(1, topk_idx)
        denom = topk_w.sum(-1, keepdim=True) + 1e-20 if self.norm_topk_prob else None

        stats: Dict[str, torch.Tensor] = {}
        capacity = expert_capacity(self.capacity_factor, t, k, e) if self.capacity_factor > 0 else t
        if self.token_rounding:
            # Counts, rounding and tables in three launches without a host sync; the plan is padded
            # to a static size (see kernels/moe/fused_routing). Few other launches: the router is
            # launch-bound, so the counts and moved totals come from the kernels.
            tables = route_tokens(select.detach(), topk_idx, self.tile_m, self.routing_implementation)
            routing = tables.routing(scores, denom)
            topk_counts = tables.topk_counts.float()
            stats["tokens_dropped"], stats["tokens_added"] = tables.moved()
        else:
            topk_counts = torch.zeros(e, device=x.device).scatter_add_(0, topk_idx.reshape(-1), torch.ones(t * k, device=x.device))
            if capacity < t:
                topk_mask = torch.zeros(t, e, dtype=torch.bool, device=x.device).scatter_(1, topk_idx, True)
                # Ranked by the router probability (Switch / V-MoE priority). The aux-free bias is one
                # constant per expert, so ranking by select would keep the same tokens.
                mask = capacity_mask(scores, topk_mask, capacity)
                # A token that lost some assignments keeps the others at their top-k weights, without
                # renormalising (Switch); one that lost all gets zero MoE output: the residual carries it.
                weight = scores / denom if denom is not None else scores
                routing = routing_from_mask(mask, weight)
                dropped = (topk_mask & ~mask).sum().detach()
                stats["tokens_dropped"] = dropped
                stats["tokens_added"] = torch.zeros((), dtype=torch.int64, device=x.device)
                stats["dropped_assignment_fraction"] = dropped.float() / (t * k)
                stats["dropped_token_fraction"] = (~mask.any(1)).sum().float().detach() / t
            else:
                routing = routing_from_topk(topk_idx, topk_w / denom if denom is not None else topk_w, e)
                zero = torch.zeros((), dtype=torch.int64, device=x.device)
                stats["tokens_dropped"], stats["tokens_added"] = zero, zero
                if self.capacity_factor > 0:  # on, but the capacity (>= T) cannot bind at this batch size
                    stats["dropped_assignment_fraction"] = torch.zeros((), device=x.device)
                    stats["dropped_token_fraction"] = torch.zeros((), device=x.device)
        load = routing.counts.float()
        stats["expert_load"] = load.detach()
        stats["experts_per_token"] = (load.sum() / max(t, 1)).detach()

        # The balance loss and the aux-free bias see the router's choice before capacity dropping
        # (topk_counts, probs of all tokens), as Switch computes its aux loss: they steer the router
        # towards balance, which is what makes fewer assignments overflow the capacity.
        aux = None
        if self.load_balancing == "aux_loss" and self.aux_loss_coef > 0:
            probs = scores if self.score_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
            frac = topk_counts / max(t * k, 1)
            balance = self.aux_loss_coef * e * (frac * probs.mean(0)).sum()
            stats["balance_loss"] = balance.detach()
            aux = balance
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
            stats["z_loss"] = z.detach()
            aux = z if aux is None else aux + z
        if self.load_balancing == "aux_free":
            if self.training and torch.is_grad_enabled():
                with torch.no_grad():
                    self.expert_bias += self.bias_lr * torch.sign(topk_counts.mean() - topk_counts)
            stats["expert_bias"] = self.expert_bias.detach().clone()
        return routing, aux, stats
