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


def fp32_dot_options() -> dict:
    """The DOT_PRECISION constexpr every kernel with a tl.dot takes (tl.dot's input_precision; a
    launch-level default is not consulted by tl.dot, so it is passed explicitly), following
    PyTorch's own matmul policy:
    TF32 tensor cores only where `torch.backends.cuda.matmul.allow_tf32` (or
    `torch.set_float32_matmul_precision("high")`) allows them for torch.matmul, exact fp32 ("ieee")
    otherwise. bf16/fp16 operands are unaffected. The interpreter always computes in fp32."""
    return {"DOT_PRECISION": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"}
