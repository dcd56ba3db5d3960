"""Triton RMSNorm forward/backward over rows of a (M, D) matrix, one whole row per program.

Forward optionally fuses the residual add (h = x + r, written out because the block needs it
for the next residual) and saves only rstd (M,) fp32 for the backward. Backward recomputes the
normalized row from h and rstd; each program walks a contiguous run of rows and keeps its
partial dweight in registers, written to a (programs, D) fp32 buffer summed afterwards (no atomics,
so the result is deterministic).
"""

import torch
import triton
import triton.language as tl

from .._triton import interpreting


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # add in fp32 and round once to h's dtype (the promotion of x's and r's), as torch does
        h = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    # cast the normalized row to the input dtype before the weight multiply (HF Llama semantics)
    normed = (hf * rstd).to(H.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH_OUT, H, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_dh_out, stride_h, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_DH_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row64 = row_start + i
        # the last program may run past n_rows: mask those rows off entirely (row64 is broadcast to a
        # vector first: the Triton 3.9 interpreter rejects a vector & scalar-bool mask)
        row_mask = mask & ((cols * 0 + row64) < n_rows)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=row_mask, other=0.0).to(tl.float32)
        h = tl.load(H + row64 * stride_h + cols, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row64, n_rows - 1))  # in bounds; the row itself is masked
        normed = h * rstd
        # dweight sees the rounded normalized row, exactly what multiplied the weight
        dw += dy * normed.to(H.dtype.element_ty).to(tl.float32)
        dn = dy * w
        dh = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
        if HAS_DH_OUT:
            # h is also an output (next residual); its incoming gradient joins here
            dh += tl.load(DH_OUT + row64 * stride_dh_out + cols, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=row_mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 16)


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, residual2d=None):
    """x2d, residual2d: (M, D) with unit last stride. Returns (y, h or None, rstd); h's dtype is the
    promotion of x's and residual's, y's that of h's and weight's (torch's type promotion)."""
    m, d = x2d.shape
    h_dtype = x2d.dtype if residual2d is None else torch.promote_types(x2d.dtype, residual2d.dtype)
    out_dtype = torch.promote_types(h_dtype, weight.dtype)
    y = torch.empty((m, d), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    h = torch.empty((m, d), dtype=h_dtype, device=x2d.device) if residual2d is not None else None
    block, warps = _block_and_warps(d)
    if m:
        _rms_norm_fwd_kernel[(m,)](
            # without a residual, H aliases X: only its dtype is used (nothing is stored to it)
            x2d, residual2d if residual2d is not None else x2d, weight, y, h if h is not None else x2d, rstd,
            x2d.stride(0), residual2d.stride(0) if residual2d is not None else 0, y.stride(0),
            h.stride(0) if h is not None else 0,
            d, eps,
            HAS_RESIDUAL=residual2d is not None, BLOCK=block, num_warps=warps,
        )
    return y, h, rstd


def _num_programs(device: torch.device, n_rows: int) -> int:
    if interpreting() or device.type != "cuda":
        return max(1, min(n_rows, 4))  # the interpreter gains nothing from many programs
    return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


def rms_norm_backward(dy2d, h2d, weight, rstd, dh_out2d=None):
    """Returns (dx (M, D) in h's dtype, dweight in weight's dtype)."""
    m, d = h2d.shape
    dx = torch.empty_like(h2d)
    programs = _num_programs(h2d.device, m)
    rows_per_program = triton.cdiv(m, programs) if m else 0
    dw_partial = torch.zeros((programs, d), dtype=torch.float32, device=h2d.device)
    block, warps = _block_and_warps(d)
    if m:
        _rms_norm_bwd_kernel[(programs,)](
            dy2d, dh_out2d if dh_out2d is not None else dy2d, h2d, weight, rstd, dx, dw_partial,
            dy2d.stride(0), dh_out2d.stride(0) if dh_out2d is not None else 0, h2d.stride(0), dx.stride(0),
            m, d, rows_per_program,
            HAS_DH_OUT=dh_out2d is not None, BLOCK=block, num_warps=warps,
        )
    return dx, dw_partial.sum(0).to(weight.dtype)
