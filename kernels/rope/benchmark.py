"""RoPE benchmark cases (run through `python -m sparsetron.kernels.benchmark_dense_kernels --only rope`)."""

import torch

from ..rope.function import apply_rope_qk
from ..rope.reference import apply_rope_qk_reference


def cases(device: torch.device, batch: int = 4, seq: int = 2048, q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128):
    from ..benchmark_dense_kernels import Case

    # Llama-3 tables (theta 5e5, no scaling), built here: kernels/ imports nothing from the model
    inv_freq = 500000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)

    def inputs():
        q = torch.randn(batch, seq, q_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        return [q, k]

    n = batch * seq * (q_heads + kv_heads) * head_dim
    return [
        Case(
            kernel="rope", name="q+k bf16 GQA", shapes={"batch": batch, "seq": seq, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim},
            make_inputs=inputs,
            impls={"triton": lambda q, k: apply_rope_qk(q, k, cos, sin), "eager": lambda q, k: apply_rope_qk_reference(q, k, cos, sin)},
            tol=1e-2,
            bytes_fwd=4 * n, bytes_fwd_bwd=8 * n,  # read + write q and k (2 B) each way
        )
    ]


if __name__ == "__main__":
    from ..benchmark_dense_kernels import main

    main(cases(torch.device("cuda")))
