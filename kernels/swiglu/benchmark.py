"""SwiGLU benchmark cases (run through `python -m sparsetron.kernels.benchmark_dense_kernels --only swiglu`)."""

import torch

from .function import swiglu
from .reference import swiglu_reference


def cases(device: torch.device, rows: int = 8192, ffn_dim: int = 11008):
    from ..benchmark_dense_kernels import Case

    def inputs():
        return [torch.randn(rows, ffn_dim, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]

    n = rows * ffn_dim
    return [
        Case(
            kernel="swiglu", name="bf16", shapes={"rows": rows, "ffn_dim": ffn_dim},
            make_inputs=inputs, impls={"triton": swiglu, "eager": swiglu_reference}, tol=1e-2,
            bytes_fwd=6 * n, bytes_fwd_bwd=16 * n,  # fwd: g, u -> y; bwd: dy, g, u -> dg, du (2 B each)
        )
    ]


if __name__ == "__main__":
    from ..benchmark_dense_kernels import main

    main(cases(torch.device("cuda")))
