"""Helpers shared by the kernel tests."""

import torch

# relative-error tolerances vs the reference (CONTRIBUTING.md, "Add a kernel": fp32 ~1e-5,
# bf16 operands 1e-3..1e-2)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
