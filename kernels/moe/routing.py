"""The routing plan shared by every expert implementation (reference loop, grouped_mm anchor, Triton).

Assignments (token -> expert pairs) are grouped by expert, so expert ``e`` owns the contiguous rows
``expert_offsets[e]:expert_offsets[e+1]``. A token may have any number of assignments (token
rounding adds and drops some), so the combine step is a segment sum over a token-major order:
``dest_row[a]`` is the slot of assignment ``a`` in that order and token ``t`` owns slots
``token_offsets[t]:token_offsets[t+1]``. Everything is built with tensor ops on the routing
device (no host loop over experts).
"""

from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class Routing:
    num_tokens: int
    num_experts: int
    sorted_token: torch.Tensor  # (A,) int32: token of each assignment, grouped by expert
    sorted_weight: torch.Tensor  # (A,) float32, differentiable: the combine weight
    expert_offsets: torch.Tensor  # (E+1,) int32
    dest_row: torch.Tensor  # (A,) int32: slot of each assignment in token-major order
    token_offsets: torch.Tensor  # (T+1,) int32
    fixed_k: int = 0  # > 0 when every token has exactly fixed_k slots (plain top-k)
    _schedules: Dict[int, tuple] = field(default_factory=dict, repr=False)

    @property
    def num_assignments(self) -> int:
        return self.sorted_token.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        return self.expert_offsets[1:] - self.expert_offsets[:-1]

    def tile_schedule(self, block_m: int):
        """(tile_expert, tile_offsets, num_tile_slots) for a grouped GEMM with M-tile ``block_m``.

        Each expert gets ceil(count / block_m) M-tiles, so variable loads need no padding to the
        largest expert. ``tile_expert[i]`` is the expert of M-tile i (== E past the last tile),
        and the launch size is the host-known bound ceil(A / block_m) + E, so building the schedule
        needs no device-to-host sync."""
        if block_m not in self._schedules:
            counts = self.counts.to(torch.int64)
            m_tiles = (counts + block_m - 1) // block_m
            tile_offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=counts.device)
            tile_offsets[1:] = torch.cumsum(m_tiles, 0)
            slots = -(-self.num_assignments // block_m) + self.num_experts
            ids = torch.arange(slots, device=counts.device)
            tile_expert = torch.searchsorted(tile_offsets[1:].contiguous(), ids, right=True)
            self._schedules[block_m] = (tile_expert.to(torch.int32), tile_offsets.to(torch.int32), slots)
        return self._schedules[block_m]


def routing_from_topk(topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int) -> Routing:
    """Plain top-k: every token has k assignments; token-major slot of (t, j) is t*k + j."""
    t, k = topk_idx.shape
    flat_e = topk_idx.reshape(-1)
    perm = torch.argsort(flat_e, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_e.device)
    counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))  # bincount without a host sync
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat_e.device)
    offsets[1:] = torch.cumsum(counts, 0)
    token_offsets = torch.arange(0, t * k + 1, k, dtype=torch.int32, device=flat_e.device)
    return Routing(
        num_tokens=t,
        num_experts=num_experts,
        sorted_token=torch.div(perm, k, rounding_mode="floor").to(torch.int32),
        sorted_weight=topk_weight.reshape(-1)[perm].float(),
        expert_offsets=offsets,
        dest_row=perm.to(torch.int32),
        token_offsets=token_offsets,
        fixed_k=k,
    )


def routing_from_mask(mask: torch.Tensor, weight: torch.Tensor) -> Routing:
    """Any (T, E) boolean assignment mask (token rounding); ``weight`` (T, E) gives combine weights."""
    t, e = mask.shape
    pairs = mask.t().nonzero()  # (A, 2) rows (expert, token), expert-major then token order
    expert, token = pairs[:, 0], pairs[:, 1]
    counts = mask.sum(0)
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=mask.device)
    offsets[1:] = torch.cumsum(counts, 0)
    per_token = mask.sum(1)
    token_offsets = torch.zeros(t + 1, dtype=torch.int32, device=mask.device)
    token_offsets[1:] = torch.cumsum(per_token, 0)
    # token-major row of pair (expert, token): the token's first row + how many lower experts it uses
    rank_in_token = mask.cumsum(1, dtype=torch.int32) - 1
    dest = token_offsets[token] + rank_in_token[token, expert]
    return Routing(
        num_tokens=t,
        num_experts=e,
        sorted_token=token.to(torch.int32),
        sorted_weight=weight[token, expert].float(),
        expert_offsets=offsets,
        dest_row=dest.to(torch.int32),
        token_offsets=token_offsets,
        fixed_k=0,
    )
