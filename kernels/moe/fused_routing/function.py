"""Public entry ``route_tokens``: the routing plan of a top-k choice, optionally token-rounded,
built without a device-to-host sync (Triton when usable, else the PyTorch reference). The output
(RoutingTables, static-size when rounding) is described in tables.py.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ..._triton import interpreting, triton_usable
from .tables import RoutingTables, max_assignments


@dataclass(frozen=True)
class RoutingBlocks:
    """Launch shapes: scatter token block, radix chunk and digit bits, token block of the tables (also
    phase 2's write granularity) and how many of them phase 2 writes per step. The token blocks of
    phases 1 and 3 shrink for E > 128 so a program's (E, block) tile stays at 1024 / 4096 elements.
    Defaults: no register spills for sm_90 at E=128 (compile_check.py)."""

    scatter_t: int = 8
    chunk: int = 1024
    radix_bits: int = 4
    bt: int = 32
    sub: int = 32
    scatter_warps: int = 4
    round_warps: int = 8
    tables_warps: int = 8

    def __post_init__(self):
        if self.radix_bits not in (1, 2, 4, 8):
            raise ValueError(f"RoutingBlocks.radix_bits must be 1, 2, 4 or 8 (it divides 32), got {self.radix_bits}")
        for name in ("scatter_t", "chunk", "bt", "sub"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"RoutingBlocks.{name} must be a power of two, got {v}")


# Under the interpreter: small blocks, so ragged T crosses several chunks and token blocks.
INTERPRETER_BLOCKS = RoutingBlocks(scatter_t=16, chunk=64, radix_bits=8, bt=16, sub=2, scatter_warps=1, round_warps=1, tables_warps=1)


def _check(select: torch.Tensor, topk_idx: torch.Tensor, tile_m: int) -> None:
    if select.dim() != 2:
        raise ValueError(f"select must be (tokens, experts), got shape {tuple(select.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != select.shape[0]:
        raise ValueError(f"topk_idx must be (tokens={select.shape[0]}, k), got shape {tuple(topk_idx.shape)}")
    if not 1 <= topk_idx.shape[1] <= select.shape[1]:
        raise ValueError(f"topk_idx's k must be in [1, experts={select.shape[1]}], got {topk_idx.shape[1]}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if tile_m < 0:
        raise ValueError(f"tile_m must be >= 0 (0 or 1: no rounding), got {tile_m}")
    if select.numel() >= 2**31:  # the kernels index the (E, T) tables with int32 offsets
        raise ValueError(f"select must have fewer than 2**31 elements (tokens x experts), got {tuple(select.shape)}")


def route_tokens(
    select: torch.Tensor, topk_idx: torch.Tensor, tile_m: int = 0, implementation: str = "auto",
    blocks: Optional[RoutingBlocks] = None,
) -> RoutingTables:
    """Routing tables of a top-k choice: ``select`` (T, E) the scores the choice was made on (they
    rank tokens for rounding), ``topk_idx`` (T, k) distinct experts per token. ``tile_m`` > 1
    rounds every expert's count to a multiple of it (token_rounding_mask's semantics, ties by token
    index). implementation: "auto" (Triton on CUDA / under the interpreter), "triton" or "torch"."""
    _check(select, topk_idx, tile_m)
    if implementation not in ("auto", "triton", "torch"):
        raise ValueError(f"implementation must be one of ('auto', 'triton', 'torch'), got {implementation!r}")
    usable = triton_usable(select, topk_idx)
    if implementation == "triton" and not usable:
        raise ValueError("implementation='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    if implementation == "torch" or not usable or select.shape[0] == 0:
        from .reference import route_tokens_reference

        return route_tokens_reference(select, topk_idx, tile_m)
    return _route_tokens_triton(select, topk_idx, tile_m, blocks or (INTERPRETER_BLOCKS if interpreting() else RoutingBlocks()))


def _route_tokens_triton(select, topk_idx, tile_m, blk: RoutingBlocks) -> RoutingTables:
    import triton

    from . import kernel as K

    t, e = select.shape
    k = topk_idx.shape[1]
    rounding = tile_m > 1
    dev = select.device
    select = select.detach()
    if select.dtype != torch.float32:
        select = select.float()  # exact for bf16/fp16: the order is unchanged
    if select.stride(1) != 1:
        select = select.contiguous()
    topk_idx = topk_idx.contiguous()
    e_pow2 = triton.next_power_of_2(e)
    a_max = max_assignments(t, k, e, tile_m)
    bt = max(1, min(blk.bt, 4096 // e_pow2))
    num_blocks = triton.cdiv(t, bt)

    counts = torch.zeros(e, dtype=torch.int32, device=dev)
    sel_t = torch.empty(e, t, dtype=torch.int8, device=dev)
    key_t = torch.empty(e, t, dtype=torch.int32, device=dev) if rounding else sel_t  # unused without rounding
    scatter_t = max(1, min(blk.scatter_t, 1024 // e_pow2))
    K.scatter_topk_kernel[(triton.cdiv(t, scatter_t),)](
        select, topk_idx, key_t, sel_t, counts, t, e, select.stride(0),
        K=k, WRITE_KEYS=rounding, E_POW2=e_pow2, BLOCK_T=scatter_t, num_warps=blk.scatter_warps,
    )
    offsets = torch.empty(e + 1, dtype=torch.int32, device=dev)
    blk_prefix = torch.empty(e, num_blocks, dtype=torch.int32, device=dev)
    moved = torch.empty(2, dtype=torch.int32, device=dev)
    K.round_experts_kernel[(e,)](
        key_t, sel_t, counts, offsets, blk_prefix, moved, t, e, max(tile_m, 1), num_blocks,
        ROUND=rounding, TILE_BITS=max(tile_m, 1).bit_length(), E_POW2=e_pow2, CHUNK=blk.chunk,
        SUB=blk.sub, BT=bt, RADIX_BITS=blk.radix_bits, num_warps=blk.round_warps,
    )
    sorted_token = torch.empty(a_max, dtype=torch.int32, device=dev)
    pair_index = torch.empty(a_max, dtype=torch.int64, device=dev)
    dest_row = torch.empty(a_max, dtype=torch.int32, device=dev)
    token_offsets = torch.empty(t + 1, dtype=torch.int32, device=dev)
    row_valid = torch.empty(a_max, dtype=torch.float32, device=dev) if rounding else None
    K.routing_tables_kernel[(num_blocks,)](
        sel_t, blk_prefix, offsets, sorted_token, pair_index, dest_row, token_offsets,
        row_valid if rounding else token_offsets, t, e, num_blocks, a_max,
        PADDED=rounding, E_POW2=e_pow2, BT=bt, PAD_BLOCK=256, num_warps=blk.tables_warps,
    )
    return RoutingTables(t, e, k, rounding, offsets, sorted_token, pair_index, dest_row, token_offsets, counts, moved, row_valid)
