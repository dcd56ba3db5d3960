"""Sync-free routing plan (plain top-k or SonicMoE token rounding) in three Triton launches."""

from .function import RoutingBlocks, route_tokens
from .tables import RoutingTables, max_assignments

__all__ = ["RoutingBlocks", "RoutingTables", "max_assignments", "route_tokens"]
