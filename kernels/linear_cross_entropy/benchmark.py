"""Linear + cross-entropy benchmark cases (run through
`python -m sparsetron.kernels.benchmark_dense_kernels --only linear_cross_entropy`). The number that
matters most is peak memory: the reference materialises (N, V) logits in bf16 and fp32."""

import torch

from .function import linear_cross_entropy
from .reference import linear_cross_entropy_reference


def cases(device: torch.device, tokens: int = 8192, dim: int = 4096, vocab: int = 128256):
    from ..benchmark_dense_kernels import Case
    from .kernel import default_chunk_size

    def inputs():
        hidden = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(vocab, dim, device=device) / dim**0.5).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, vocab, (tokens,), device=device)
        targets[torch.rand(tokens, device=device) < 0.1] = -100
        return [hidden, weight, targets]

    gemm = 2.0 * tokens * vocab * dim
    chunk = default_chunk_size(tokens, vocab, dim)

    def with_chunk(rows):
        return lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=rows)

    return [
        Case(
            kernel="linear_cross_entropy", name=f"bf16 V={vocab}", shapes={"tokens": tokens, "dim": dim, "vocab": vocab, "default_chunk_size": chunk},
            make_inputs=inputs,
            # the chunk-size variants show the memory/speed trade-off of the default (timed only)
            impls={"triton": linear_cross_entropy, "eager": linear_cross_entropy_reference,
                   "triton_chunk256": with_chunk(256), "triton_chunk4096": with_chunk(4096)},
            tol=1e-2,
            flops_fwd=gemm, flops_fwd_bwd=3 * gemm,
            notes="triton's forward already runs the two gradient GEMMs (its backward is a scale), so compare fwd+bwd",
        )
    ]


if __name__ == "__main__":
    from ..benchmark_dense_kernels import main

    main(cases(torch.device("cuda")))
