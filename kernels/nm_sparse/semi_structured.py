"""N:M linear forward: 2:4 semi-structured (cuSPARSELt) matmul on GPU, masked dense elsewhere.

`nm_linear` is what a sparse layer calls. It masks the weight (SR-STE straight-through or a
fixed mask), then either packs the masked weight with `to_sparse_semi_structured`-style
compression and runs the sparse tensor-core matmul for the forward, or runs plain `F.linear`
on the masked weight. The backward is dense either way (grad_x = g @ W~, grad_W~ = g^T x): a
2:4 mask along the input dim is not 2:4 along the output dim, so W~^T cannot reuse the packing.

When the fast path cannot run (CPU, fp32, a pattern that is not a subset of 2:4, a shape the
backend refuses, sm < 80, sm90 without cuSPARSELt: there is no CUTLASS path there) the layer
falls back to masked dense and logs one warning per reason.
"""

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .function import fixed_masked_weight, srste_masked_weight

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "packed", "dense")  # auto: packed where it pays; packed: wherever it runs; dense: never
# "auto" packs a weight only when both of its sides are at least this. Measured on an H200 (cuSPARSELt 0.8,
# 16K tokens, BENCHMARKS.md "N:M"): the packed forward is 7-30x slower than dense at sides 256-2048 (a fixed
# per-call cost of ~0.5 ms), and 1.19x faster for an 8192^3 GEMM; 4096 is between the two, unmeasured.
MIN_PACKED_DIM = 4096
MODES = ("srste", "fixed")
_warned: set = set()
_broken: set = set()  # (device, dtype, shape) keys whose packing failed at run time


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("N:M sparse linear: semi-structured 2:4 path unavailable (%s); using masked dense", reason)


def is_2to4_subset(n: int, m: int) -> bool:
    """True when every aligned group of 4 inputs holds at most 2 nonzeros for any n:m mask
    (2:4, 1:4, 1:2, 2:8, 1:8, ...). 4:8 is not: a group of 8 may put all 4 in one half."""
    if m % 4 == 0:
        return n <= 2
    if 4 % m == 0:
        return n * (4 // m) <= 2
    return False


def _sparse_class() -> Tuple[Optional[type], str]:
    """cuSPARSELt when present; CUTLASS only on sm8x (it has no sm90 kernels)."""
    if torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT, ""
    major, _ = torch.cuda.get_device_capability()
    if major == 8:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS, ""
    return None, f"cuSPARSELt not available on sm{major}x and CUTLASS 2:4 kernels exist only for sm8x"


def packing_pays(shape, min_dim: int = MIN_PACKED_DIM) -> bool:
    """Whether a weight is big enough for the packed 2:4 forward to beat masked dense (backend auto)."""
    return min(shape) >= min_dim


def semi_structured_unavailable(device: torch.device, dtype: torch.dtype, shape, n: int, m: int,
                                backend: str = "packed") -> Optional[str]:
    """None if the packed 2:4 forward can run (and, for backend "auto", pays) for this weight, else the
    reason it does not."""
    if device.type != "cuda":
        return f"device {device.type} (needs CUDA)"
    if not is_2to4_subset(n, m):
        return f"pattern {n}:{m} is not a subset of 2:4"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (cuSPARSELt takes float16/bfloat16; train under autocast)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "GPU older than sm80"
    cls, why = _sparse_class()
    if cls is None:
        return why
    cons = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = shape
    if rows % cons.sparse_min_rows or cols % cons.sparse_min_cols:
        return f"weight shape {tuple(shape)} not a multiple of ({cons.sparse_min_rows}, {cons.sparse_min_cols}) for {cls.BACKEND}"
    if (device, dtype, tuple(shape)) in _broken:
        return f"packing failed before for {tuple(shape)} {dtype}"
    if backend == "auto" and not packing_pays(shape):
        return (f"weight shape {tuple(shape)} has a side below {MIN_PACKED_DIM}: there cuSPARSELt's per-call cost "
                f"exceeds the 2:4 saving (sparsity.backend=packed forces it)")
    return None


def pack_2to4(w_masked: torch.Tensor):
    """Compressed 2:4 tensor of an already-masked weight (values + metadata)."""
    cls, _ = _sparse_class()
    return cls.from_dense(w_masked.detach().contiguous())


class SemiStructuredLinear(torch.autograd.Function):
    """y = x @ W~^T + b with the forward on a packed 2:4 weight, dense backward.

    `packed` is the compressed W~ (any tensor F.linear accepts: the CPU tests pass W~ itself
    to check the backward math)."""

    @staticmethod
    def forward(ctx, x, w_masked, bias, packed):
        ctx.save_for_backward(x, w_masked)
        ctx.has_bias = bias is not None
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x2d, packed, bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, w_masked = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2d @ w_masked).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g2d.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, mode: str, decay: float = 0.0) -> torch.Tensor:
    """W~ = W * M with the gradient rule of `mode`: "srste" straight-through (+ decay), "fixed" masked."""
    if mode == "srste":
        return srste_masked_weight(weight, mask, decay)
    if mode == "fixed":
        return fixed_masked_weight(weight, mask)
    raise ValueError(f"nm_linear: mode must be one of {MODES}, got {mode!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def nm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    n: int,
    m: int,
    mode: str = "srste",
    decay: float = 0.0,
    backend: str = "auto",
    packed=None,
) -> torch.Tensor:
    """Linear with an N:M-masked weight. backend "auto": packed 2:4 forward where supported and the
    weight is big enough to gain from it, masked dense otherwise (one warning per reason); "packed":
    wherever supported; "dense": always masked dense.
    `packed`: a cached packing of the masked weight (inference, weights unchanged)."""
    if backend not in BACKENDS:
        raise ValueError(f"nm_linear: backend must be one of {BACKENDS}, got {backend!r}")
    w = masked_weight(weight, mask, mode, decay)
    if n == m:  # dense stage (calibration, start of a ramp): nothing to accelerate, nothing to warn
        return F.linear(x, w, bias)
    if backend == "dense":
        return F.linear(x, w, bias)
    dtype = compute_dtype(x)
    reason = semi_structured_unavailable(x.device, dtype, weight.shape, n, m, backend)
    if reason is not None:
        warn_once(reason)
        return F.linear(x, w, bias)
    x, w = x.to(dtype), w.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if packed is None:
        try:
            packed = pack_2to4(w)
        except RuntimeError as err:  # a backend that refuses this shape/dtype at run time
            _broken.add((x.device, dtype, tuple(weight.shape)))
            warn_once(f"packing {tuple(weight.shape)} {dtype} failed: {err}")
            return F.linear(x, w, bias)
    return SemiStructuredLinear.apply(x, w, bias, packed)
