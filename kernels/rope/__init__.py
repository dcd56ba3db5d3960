"""Fused rotary position embedding (HF "rotate half"), Triton forward and backward."""

from .function import apply_rope, apply_rope_qk
from .reference import apply_rope_qk_reference, apply_rope_reference

__all__ = ["apply_rope", "apply_rope_qk", "apply_rope_reference", "apply_rope_qk_reference"]
