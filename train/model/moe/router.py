"""Router: linear gate -> softmax/sigmoid scores -> top-k -> (optional) SonicMoE token rounding.

Load balancing is a config choice:
  * "aux_loss": Switch-Transformer loss  coef * E * sum_e f_e * P_e  (f_e = share of assignments,
    P_e = mean routing probability), differentiable through P_e.
  * "aux_free": DeepSeek-V3 per-expert bias added to the scores for *selection only*; after each
    training forward the bias moves by ``bias_lr * sign(mean_load - load_e)``.
  * "none".
The router z-loss  coef * mean(logsumexp(logits)^2)  is added whenever z_loss_coef > 0.
Routing runs in fp32 with tensor ops only (no host loop over experts).
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from sparsetron.kernels.moe.routing import Routing, routing_from_mask, routing_from_topk
from sparsetron.kernels.moe.token_rounding import token_rounding_mask

SCORE_FUNCS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "aux_free", "none")


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
    ):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"moe.score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if load_balancing not in LOAD_BALANCING:
            raise ValueError(f"moe.load_balancing must be one of {LOAD_BALANCING}, got {load_balancing!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe.top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if tile_m < 1:
            raise ValueError(f"moe.tile_m must be >= 1, got {tile_m}")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.load_balancing = score_func, load_balancing
        self.aux_loss_coef, self.z_loss_coef, self.bias_lr = aux_loss_coef, z_loss_coef, bias_lr
        self.token_rounding, self.tile_m = token_rounding, tile_m
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
        if denom is not None:
            topk_w = topk_w / denom

        topk_counts = torch.zeros(e, device=x.device).scatter_add_(0, topk_idx.reshape(-1), torch.ones(t * k, device=x.device))
        stats: Dict[str, torch.Tensor] = {}
        if self.token_rounding:
            topk_mask = torch.zeros(t, e, dtype=torch.bool, device=x.device).scatter_(1, topk_idx, True)
            mask = token_rounding_mask(select.detach(), topk_mask, self.tile_m)
            weight = scores / denom if denom is not None else scores
            routing = routing_from_mask(mask, weight)
            stats["tokens_dropped"] = (topk_mask & ~mask).sum().detach()
            stats["tokens_added"] = (mask & ~topk_mask).sum().detach()
        else:
            routing = routing_from_topk(topk_idx, topk_w, e)
            zero = torch.zeros((), dtype=torch.int64, device=x.device)
            stats["tokens_dropped"], stats["tokens_added"] = zero, zero
        load = routing.counts.float()
        stats["expert_load"] = load.detach()
        stats["experts_per_token"] = (load.sum() / max(t, 1)).detach()

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
