"""Fused SwiGLU activation silu(gate) * up, Triton forward and backward."""

from .function import swiglu
from .reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]
