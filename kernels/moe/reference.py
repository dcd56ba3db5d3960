"""Plain-PyTorch expert computation: a loop over experts (the test oracle and the CPU fallback).

Weights follow nn.Linear's (out, in) layout per expert:
  w_gate_up: (E, 2F, D) -- rows [0, F) are the gate, rows [F, 2F) the up projection
  w_down:    (E, D, F)
Expert e maps a token x to  w_down[e] @ (silu(gate) * up).
"""

import torch
import torch.nn.functional as F

from .routing import Routing


def swiglu_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def moe_experts_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(T, D) -> (T, D): sum over a token's assignments of weight * expert(x). Autograd does the rest."""
    bounds = routing.expert_offsets.tolist()
    tokens = routing.sorted_token.long()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
    for e in range(w_gate_up.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        tok = tokens[lo:hi]
        y = swiglu_expert(x[tok], w_gate_up[e], w_down[e])
        out = out.index_add(0, tok, y.to(out.dtype) * routing.sorted_weight[lo:hi, None].to(out.dtype))
    return out.to(x.dtype)
