"""Mixture-of-Experts operators: the routing plan, SonicMoE token rounding (and its sync-free Triton
build, fused_routing/) and the Triton grouped-GEMM expert kernels driven by a tile schedule. The
nn.Module layer (router, expert parallelism, MoEMLP) lives in sparsetron.train.model.moe."""

from .function import moe_experts
from .fused_routing import RoutingTables, route_tokens
from .reference import moe_experts_reference
from .routing import Routing, routing_from_mask, routing_from_topk
from .token_rounding import round_expert_counts, token_rounding_mask

__all__ = [
    "moe_experts",
    "route_tokens",
    "RoutingTables",
    "moe_experts_reference",
    "Routing",
    "routing_from_mask",
    "routing_from_topk",
    "round_expert_counts",
    "token_rounding_mask",
]
