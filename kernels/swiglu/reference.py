"""Plain-PyTorch SwiGLU activation: silu(gate) * up, as in `train.model.mlp.SwiGLU`."""

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
