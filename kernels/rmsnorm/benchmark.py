"""RMSNorm benchmark cases (run through `python -m sparsetron.kernels.benchmark_dense_kernels --only rmsnorm`)."""

import torch

from .function import rms_norm
from .reference import rms_norm_reference

EPS = 1e-5


def cases(device: torch.device, rows: int = 8192, dim: int = 4096):
    def fused_add_norm(fn):
        return lambda x, r, w: fn(x, w, EPS, residual=r)

    def add_norm_inputs():
        # the model under bf16 autocast: bf16 block output + fp32 residual stream, fp32 weight
        x = torch.randn(rows, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(rows, dim, device=device, requires_grad=True)
        w = (1 + 0.1 * torch.randn(dim, device=device)).requires_grad_()
        return [x, r, w]

    def bf16_inputs():
        x = torch.randn(rows, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(dim, device=device)).to(torch.bfloat16).requires_grad_()
        return [x, w]

    from ..benchmark_dense_kernels import Case

    n = rows * dim
    return [
        Case(
            kernel="rmsnorm", name="add+norm bf16x+fp32res", shapes={"rows": rows, "dim": dim},
            make_inputs=add_norm_inputs,
            impls={"triton": fused_add_norm(rms_norm), "eager": fused_add_norm(rms_norm_reference)},
            tol=1e-2,  # dx is bf16
            # fwd: read x(2)+r(4), write h(4)+y(4); bwd: read dy(4)+dh(4)+h(4), write dx(2)+dres(4)
            bytes_fwd=14 * n, bytes_fwd_bwd=32 * n,
        ),
        Case(
            kernel="rmsnorm", name="norm bf16", shapes={"rows": rows, "dim": dim},
            make_inputs=bf16_inputs,
            impls={"triton": lambda x, w: rms_norm(x, w, EPS), "eager": lambda x, w: rms_norm_reference(x, w, EPS)},
            tol=1e-2,
            bytes_fwd=4 * n, bytes_fwd_bwd=10 * n,  # fwd: x, y; bwd: dy, x, dx (2 B each)
        ),
    ]


if __name__ == "__main__":
    from ..benchmark_dense_kernels import main

    main(cases(torch.device("cuda")))
