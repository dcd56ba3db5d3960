"""Plain-PyTorch linear + cross-entropy, the semantics the chunked kernel must match.

Same as the model's head + loss: logits = hidden @ weight.T in the inputs' dtype, then
cross-entropy in float32, mean over targets != ignore_index (NaN if every target is ignored,
as torch's F.cross_entropy gives). Materialises the full (N, V) logits; the fused path must not.
"""

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)
