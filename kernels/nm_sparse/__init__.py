"""N:M structured sparsity: mask computation (Triton), SR-STE masked weights and a linear that
runs the forward on 2:4 semi-structured (cuSPARSELt) weights where the GPU allows."""

from .function import check_nm, fixed_masked_weight, nm_mask, srste_masked_weight
from .reference import nm_mask_reference, nm_pattern_ok, srste_grad_reference
from .semi_structured import is_2to4_subset, masked_weight, nm_linear, pack_2to4, semi_structured_unavailable

__all__ = [
    "check_nm",
    "fixed_masked_weight",
    "is_2to4_subset",
    "masked_weight",
    "nm_linear",
    "nm_mask",
    "nm_mask_reference",
    "nm_pattern_ok",
    "pack_2to4",
    "semi_structured_unavailable",
    "srste_grad_reference",
    "srste_masked_weight",
]
