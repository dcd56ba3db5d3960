"""The routing plan shared by every expert implementation (reference loop, grouped_mm anchor, Triton).

Assignments (token -> expert pairs) are grouped by expert, so expert ``e`` owns the contiguous rows
``expert_offsets[e]:expert_offsets[e+1]``. A token may have any number of assignments (token
rounding adds and drops some), so the combine step is a segment sum over a token-major order:
``dest_row[a]`` is the slot of assignment ``a`` in that order and token ``t`` owns slots
``token_offsets[t]:token_offsets[t+1]``. Everything is built with tensor ops on the routing
device (no host loop over experts).

A plan whose assignment count depends on the data (token rounding) can be *padded*: its per-row
tensors have a static length (an upper bound known on the host), the real count is
``expert_offsets[-1]`` on the device, and rows past it are padding (token 0, weight 0) that no
expert kernel reads. Building and consuming it then needs no device-to-host sync; ``compact()``
trims it (one sync) for consumers that need exact sizes (the expert-parallel all-to-all).
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
    padded: bool = False  # rows at and past expert_offsets[-1] are padding (see the module docstring)
    _schedules: Dict[int, tuple] = field(default_factory=dict, repr=False)

    @property
    def num_assignments(self) -> int:
        """Rows of the per-row tensors: the real count, or its static upper bound when padded."""
        return self.sorted_token.shape[0]

    def valid_rows(self) -> torch.Tensor:
        """(A,) bool: True for real rows (all of them unless padded). No host sync."""
        rows = torch.arange(self.num_assignments, device=self.expert_offsets.device)
        return rows < self.expert_offsets[-1].to(rows.dtype)

    def compact(self) -> "Routing":
        """The same plan without padding rows (one device-to-host sync; a no-op when not padded)."""
        if not self.padded:
            return self
        a = int(self.expert_offsets[-1])
        return Routing(self.num_tokens, self.num_experts, self.sorted_token[:a], self.sorted_weight[:a],
                       self.expert_offsets, self.dest_row[:a], self.token_offsets, self.fixed_k)

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


def mask_tables(mask: torch.Tensor):
    """Routing tables of a (T, E) boolean assignment mask: (token, expert, expert_offsets, dest_row,
    token_offsets). Rows are expert-major, tokens ascending inside an expert; a token's slots are its
    experts in ascending order. ``nonzero`` makes the row count known on the host (a sync on CUDA)."""
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
    return token, expert, offsets, dest.to(torch.int32), token_offsets


def routing_from_mask(mask: torch.Tensor, weight: torch.Tensor) -> Routing:
    """Any (T, E) boolean assignment mask (capacity dropping); ``weight`` (T, E) gives combine weights."""
    t, e = mask.shape
    token, expert, offsets, dest, token_offsets = mask_tables(mask)
    return Routing(
        num_tokens=t,
        num_experts=e,
        sorted_token=token.to(torch.int32),
        sorted_weight=weight[token, expert].float(),
        expert_offsets=offsets,
        dest_row=dest,
        token_offsets=token_offsets,
        fixed_k=0,
    )
