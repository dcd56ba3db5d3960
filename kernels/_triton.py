"""When the Triton path can run: on a CUDA tensor, or anywhere under TRITON_INTERPRET=1 (CI on CPU)."""

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """True if every tensor can go through a Triton kernel (GPU, or the CPU interpreter)."""
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)
