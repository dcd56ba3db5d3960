"""Mixture-of-Experts MLP layer: the Router (top-k, aux losses, aux-free bias, token rounding),
expert parallelism (all-to-all over an ``ep_group``) and MoEMLP, registered as model.mlp == "moe"
by importing .layer. The expert GEMMs themselves are operators in sparsetron.kernels.moe."""

from .router import Router

__all__ = ["Router"]
