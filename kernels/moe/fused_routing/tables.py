"""The output of route_tokens: the integer tables of a routing plan, and the static row bound.

The row count of a rounded plan depends on the data, so the per-row tensors get a static length
``max_assignments(T, k, E, tile_m)``: T*k + tile_m // 2 bounds it (the rounding moves the total
by at most half a tile, see round_expert_counts). The real count stays on the device as
``expert_offsets[-1]``; the rows past it are padding that the expert kernels never read.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ..routing import Routing


@dataclass
class RoutingTables:
    """Integer part of a routing plan (no autograd); ``routing()`` adds the differentiable weights."""

    num_tokens: int
    num_experts: int
    top_k: int
    rounded: bool
    expert_offsets: torch.Tensor  # (E+1,) int32
    sorted_token: torch.Tensor  # (A_max,) int32, expert-major, tokens ascending inside an expert
    pair_index: torch.Tensor  # (A_max,) int64: token * E + expert of each row (0 on padding)
    dest_row: torch.Tensor  # (A_max,) int32: token-major slot (a token's experts in ascending order)
    token_offsets: torch.Tensor  # (T+1,) int32
    topk_counts: torch.Tensor  # (E,) int32: per-expert counts of the top-k choice, before rounding
    moved_counts: torch.Tensor  # (2,) int32: assignments the rounding dropped, added
    row_valid: Optional[torch.Tensor]  # (A_max,) float32 when padded: 1.0 on real rows, 0.0 on padding

    @property
    def padded(self) -> bool:
        return self.rounded

    @property
    def counts(self) -> torch.Tensor:
        return self.expert_offsets[1:] - self.expert_offsets[:-1]

    def moved(self):
        """(dropped, added) assignment counts of the rounding, as device scalars (views: no launch)."""
        return self.moved_counts[0], self.moved_counts[1]

    def routing(self, scores: torch.Tensor, denom: Optional[torch.Tensor] = None) -> Routing:
        """Routing with combine weight scores[t, e] (/ denom[t]) per row, differentiable in both.
        Few launches on purpose (a router is launch-bound): divide, gather, and the row mask."""
        weight = scores / denom if denom is not None else scores
        w = weight.reshape(-1).gather(0, self.pair_index).float()  # backward: a scatter-add (no sync)
        if self.padded:  # padding rows carry weight 0 (and a zero gradient: every consumer skips them)
            w = w * self.row_valid
        return Routing(self.num_tokens, self.num_experts, self.sorted_token, w, self.expert_offsets,
                       self.dest_row, self.token_offsets, fixed_k=0 if self.rounded else self.top_k, padded=self.padded)


def max_assignments(num_tokens: int, top_k: int, num_experts: int, tile_m: int) -> int:
    """Static bound on the rows of a plan: T*k, + half a tile when rounding (never above T*E)."""
    if tile_m <= 1:
        return num_tokens * top_k
    return min(num_tokens * top_k + tile_m // 2, num_tokens * num_experts)
