"""Mixture-of-Experts MLP: router (top-k, aux losses, aux-free bias, token rounding), Triton
grouped-GEMM expert kernels driven by a tile schedule, expert parallelism, and the MoEMLP module
(registered as model.mlp == "moe" by importing .layer)."""

from .function import moe_experts
from .reference import moe_experts_reference
from .router import Router
from .routing import Routing, routing_from_mask, routing_from_topk

__all__ = ["moe_experts", "moe_experts_reference", "Router", "Routing", "routing_from_mask", "routing_from_topk"]
