"""Autograd wrapper around the Triton MoE kernels, and the public entry point ``moe_experts``.

What backward keeps (SonicMoE's memory-lean recipe): the layer input x (T, D) -- already alive as
the residual stream -- the routing plan (int32 indices + fp32 weights), and the pre-activation
H = [gate | up] (A, 2F) in the activation dtype. No gathered copy of x per expert, no act (it is
recomputed from H inside the first backward kernel) and no expert outputs (the router-weight
gradient is <dy[token] @ W2, act>, computed in that same epilogue).
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from .._triton import fp32_dot_options, interpreting, triton_usable
from . import kernel as K
from .reference import moe_experts_reference
from .routing import Routing

# grouped_mm: the argsort + torch._grouped_mm layer (the benchmark anchor), trainable too, so
# multi-GPU runs can compare the fused kernels against it inside a real model.
IMPLEMENTATIONS = ("auto", "triton", "torch", "grouped_mm")


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: block_m is the tile-schedule M-tile (shared by every grouped GEMM of a call)."""

    block_m: int = 128
    up_n: int = 128
    up_k: int = 64
    up_warps: int = 8
    up_stages: int = 3
    mm_n: int = 128
    mm_k: int = 64
    mm_warps: int = 8
    mm_stages: int = 3
    wg_i: int = 128
    wg_j: int = 128
    wg_k: int = 64
    wg_warps: int = 8
    wg_stages: int = 3


# Small tiles under the CPU interpreter: cheap, and ragged shapes then cross several tiles.
INTERPRETER_BLOCKS = Blocks(32, 32, 32, 4, 1, 64, 32, 4, 1, 32, 64, 32, 4, 1)


def default_blocks(dtype: torch.dtype) -> Blocks:
    if interpreting():
        return INTERPRETER_BLOCKS
    if dtype == torch.float32:  # fp32 tiles take twice the shared memory
        return Blocks(128, 64, 32, 8, 3, 64, 32, 4, 3, 64, 64, 32, 4, 3)
    return Blocks()


def _launch_gemm(a, w, out, scale, routing: Routing, n, k, stride_be, stride_bk, stride_bn, blk: Blocks):
    tile_expert, tile_offsets, slots = routing.tile_schedule(blk.block_m)
    grid = (slots * triton.cdiv(n, blk.mm_n),)
    K.grouped_gemm_kernel[grid](
        a, w, out, scale if scale is not None else a, routing.dest_row, routing.expert_offsets, tile_expert, tile_offsets,
        routing.num_experts, n, k, a.stride(0), stride_be, stride_bk, stride_bn, out.stride(0),
        HAS_SCALE=scale is not None, BLOCK_M=blk.block_m, BLOCK_N=blk.mm_n, BLOCK_K=blk.mm_k, DOT_FP32=interpreting(),
        num_warps=blk.mm_warps, num_stages=blk.mm_stages, **fp32_dot_options(),
    )


def _segment_sum(slots: torch.Tensor, routing: Routing, num_tokens: int, dtype) -> torch.Tensor:
    if routing.fixed_k == 1:  # one slot per token, already in token order
        return slots
    d = slots.shape[1]
    out = torch.empty(num_tokens, d, dtype=dtype, device=slots.device)
    if num_tokens == 0:
        return out
    k = routing.fixed_k
    k_pow2 = triton.next_power_of_2(max(k, 1))
    block_d = min(triton.next_power_of_2(d), max(4096 // k_pow2, 64) if k else 1024)
    # Under the interpreter every program costs Python time, so batch tokens; on the GPU one token
    # per program already moves k * BLOCK_D elements.
    block_t = 16 if (k and interpreting()) else 1
    grid = (triton.cdiv(num_tokens, block_t) if k else num_tokens, triton.cdiv(d, block_d))
    K.segment_sum_kernel[grid](
        slots, out, routing.token_offsets, num_tokens, d, slots.stride(0), out.stride(0),
        FIXED_K=k, K_POW2=k_pow2, BLOCK_T=block_t, BLOCK_D=block_d, INTERP=interpreting(), num_warps=4,
    )
    return out


def _wgrad(left, right, out, routing: Routing, gather_left: bool, gather_right: bool, blk: Blocks):
    ni, nj = out.shape[1], out.shape[2]
    grid = (triton.cdiv(ni, blk.wg_i) * triton.cdiv(nj, blk.wg_j), routing.num_experts)
    K.expert_wgrad_kernel[grid](
        left, right, out, routing.sorted_token, routing.expert_offsets,
        ni, nj, left.stride(0), right.stride(0), out.stride(0), out.stride(1),
        GATHER_L=gather_left, GATHER_R=gather_right,
        BLOCK_I=blk.wg_i, BLOCK_J=blk.wg_j, BLOCK_K=blk.wg_k, DOT_FP32=interpreting(), num_warps=blk.wg_warps, num_stages=blk.wg_stages,
        **fp32_dot_options(),
    )


def experts_forward(x, w_gate_up, w_down, routing: Routing, blk: Blocks):
    """Returns (out (T, D), H (A, 2F))."""
    t, d = x.shape
    e, two_f, _ = w_gate_up.shape
    f = two_f // 2
    a_n = routing.num_assignments
    h = torch.empty(a_n, two_f, dtype=x.dtype, device=x.device)
    act = torch.empty(a_n, f, dtype=x.dtype, device=x.device)
    tile_expert, tile_offsets, slots = routing.tile_schedule(blk.block_m)
    if a_n:
        grid = (slots * triton.cdiv(f, blk.up_n),)
        K.up_swiglu_kernel[grid](
            x, w_gate_up, routing.sorted_token, routing.expert_offsets, tile_expert, tile_offsets, h, act,
            e, d, f, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h.stride(0), act.stride(0),
            BLOCK_M=blk.block_m, BLOCK_N=blk.up_n, BLOCK_K=blk.up_k, DOT_FP32=interpreting(), num_warps=blk.up_warps, num_stages=blk.up_stages,
            **fp32_dot_options(),
        )
    y = torch.empty(a_n, d, dtype=x.dtype, device=x.device)
    if a_n:
        # W2[e] is (D, F); read as the K x N matrix W2[e]^T through strides (k -> 1, n -> F).
        _launch_gemm(act, w_down, y, routing.sorted_weight, routing, d, f, w_down.stride(0), 1, w_down.stride(1), blk)
    del act
    return _segment_sum(y, routing, t, x.dtype), h


def experts_backward(dout, x, w_gate_up, w_down, h, routing: Routing, blk: Blocks, need_dweight: bool):
    t, d = x.shape
    e, two_f, _ = w_gate_up.shape
    f = two_f // 2
    a_n = routing.num_assignments
    dh = torch.empty_like(h)
    actw = torch.empty(a_n, f, dtype=x.dtype, device=x.device)
    n_tiles_f = triton.cdiv(f, blk.up_n)
    # A padded plan's padding rows are never visited: zero them so their router gradient is 0.
    dweight_parts = (torch.zeros if routing.padded else torch.empty)(n_tiles_f, a_n, dtype=torch.float32, device=x.device)
    tile_expert, tile_offsets, slots = routing.tile_schedule(blk.block_m)
    # The gradient of a slot is dout[token]: gathered inside the kernels, never materialised.
    dy = dout
    if a_n:
        K.down_bwd_swiglu_kernel[(slots * n_tiles_f,)](
            dy, w_down, h, routing.sorted_token, routing.sorted_weight, routing.expert_offsets, tile_expert, tile_offsets,
            dh, actw, dweight_parts,
            e, f, d, a_n,
            dy.stride(0), w_down.stride(0), w_down.stride(1), h.stride(0), dh.stride(0), actw.stride(0),
            BLOCK_M=blk.block_m, BLOCK_N=blk.up_n, BLOCK_K=blk.up_k, DOT_FP32=interpreting(), num_warps=blk.mm_warps, num_stages=blk.mm_stages,
            **fp32_dot_options(),
        )
    dw_down = torch.empty_like(w_down)
    dw_gate_up = torch.empty_like(w_gate_up)
    _wgrad(dy, actw, dw_down, routing, True, False, blk)  # (D, F) = dy[tok]^T @ actw
    del actw
    _wgrad(dh, x, dw_gate_up, routing, False, True, blk)  # (2F, D) = dH^T @ x[tok]
    dx_slots = torch.empty(a_n, d, dtype=x.dtype, device=x.device)
    if a_n:
        # W1[e] is (2F, D) = K x N row-major.
        _launch_gemm(dh, w_gate_up, dx_slots, None, routing, d, two_f, w_gate_up.stride(0), w_gate_up.stride(1), 1, blk)
    del dh
    dx = _segment_sum(dx_slots, routing, t, x.dtype)
    dweight = dweight_parts.sum(0) if need_dweight else None
    return dx, dw_gate_up, dw_down, dweight


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, sorted_weight, routing: Routing, blk: Blocks):
        routing = _with_weight(routing, sorted_weight.detach().float().contiguous())
        out, h = experts_forward(x, w_gate_up, w_down, routing, blk)
        ctx.save_for_backward(x, w_gate_up, w_down, h)
        ctx.routing, ctx.blk = routing, blk
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_gate_up, w_down, h = ctx.saved_tensors
        dx, dw1, dw2, dweight = experts_backward(
            dout.contiguous(), x, w_gate_up, w_down, h, ctx.routing, ctx.blk, ctx.needs_input_grad[3]
        )
        return dx, dw1, dw2, dweight, None, None


def _with_weight(routing: Routing, weight: torch.Tensor) -> Routing:
    return replace(routing, sorted_weight=weight)  # shares the tile-schedule cache


def resolve_implementation(implementation: str, *tensors: torch.Tensor) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"moe.implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    usable = triton_usable(*tensors)
    if implementation == "triton" and not usable:
        raise ValueError("moe.implementation='triton' needs CUDA tensors or TRITON_INTERPRET=1; use 'auto' or 'torch'")
    if implementation == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"moe.implementation='grouped_mm' needs torch._grouped_mm (torch >= 2.8), "
                         f"this is torch {torch.__version__}; use 'auto', 'triton' or 'torch'")
    if implementation == "auto":
        return "triton" if usable else "torch"
    return implementation


def moe_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    routing: Routing,
    implementation: str = "auto",
    blocks: Optional[Blocks] = None,
) -> torch.Tensor:
    """Expert MLP of a routed batch: (T, D) -> (T, D), differentiable in x, both weights and
    routing.sorted_weight (hence the router).

    x: (T, D); w_gate_up: (E, 2F, D) with [gate; up] rows; w_down: (E, D, F)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, dim), got shape {tuple(x.shape)}")
    e, two_f, d = w_gate_up.shape
    if d != x.shape[1] or two_f % 2 or w_down.shape != (e, d, two_f // 2):
        raise ValueError(
            f"w_gate_up must be (E, 2F, D={x.shape[1]}) and w_down (E, D, F); got {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}"
        )
    if routing.num_experts != e:
        raise ValueError(f"routing has {routing.num_experts} experts but the weights hold {e}")
    impl = resolve_implementation(implementation, x, w_gate_up, w_down)
    if impl == "torch":
        return moe_experts_reference(x, w_gate_up, w_down, routing)
    if impl == "grouped_mm":
        from .grouped_mm_anchor import moe_experts_grouped_mm

        return moe_experts_grouped_mm(x, w_gate_up.to(x.dtype), w_down.to(x.dtype), routing)
    w_gate_up = w_gate_up.to(x.dtype).contiguous()
    w_down = w_down.to(x.dtype).contiguous()
    blk = blocks or default_blocks(x.dtype)
    return MoEExpertsFunction.apply(x.contiguous(), w_gate_up, w_down, routing.sorted_weight, routing, blk)
