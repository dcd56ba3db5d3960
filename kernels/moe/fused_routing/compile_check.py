"""sm_90 compile check of the routing kernels WITHOUT a GPU (the sparse-attention checker's method:
the launch arguments come from function.py's own launch code with the kernels swapped for a
recorder, then triton.compile for sm_90 with the JIT's argument specialization; ptxas reports
registers and spills). Shapes: the issue's router benchmark class, T=16384, E=128, k=8, tile 128.

usage: python -m sparsetron.kernels.moe.fused_routing.compile_check ["{'tokens': 16384, 'experts': 128, 'k': 8, 'tile': 128}"]
Prints per kernel: shared memory bytes, registers, spill store/load bytes. Run it outside pytest (no
TRITON_INTERPRET): the kernels must be JIT functions.
"""

import contextlib
import io
import os
import sys

os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from sparsetron.kernels.moe.fused_routing import function as F  # noqa: E402
from sparsetron.kernels.moe.fused_routing import kernel as K  # noqa: E402
from sparsetron.kernels.sparse_attention.compile_check import report  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)
BACKEND = make_backend(TARGET)
NAMES = ("scatter_topk_kernel", "round_experts_kernel", "routing_tables_kernel")


class Recorder:
    def __init__(self, name, kern, captured):
        self.name, self.kern, self.captured = name, kern, captured

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.captured[self.name] = (self.kern, grid, args, kwargs)
        return call


def capture(tokens=16384, experts=128, k=8, tile=128, blocks=None):
    captured = {}
    saved = {n: getattr(K, n) for n in NAMES}
    for n in NAMES:
        setattr(K, n, Recorder(n, saved[n], captured))
    try:
        select = torch.rand(tokens, experts)
        idx = torch.randint(0, experts, (tokens, k))
        F._route_tokens_triton(select, idx, tile, blocks or F.RoutingBlocks())
    finally:
        for n in NAMES:
            setattr(K, n, saved[n])
    return captured


def compile_kernel(kern, args, kwargs):
    binder = create_function_from_signature(kern.signature, kern.params, BACKEND)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kern._pack_args(BACKEND, kwargs, bound, spec, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    compiled.ptxas_log = log.getvalue()
    return compiled


def main(shape=None):
    rows = {}
    for name, (kern, grid, args, kwargs) in capture(**(shape or {})).items():
        r = report(compile_kernel(kern, args, kwargs))
        rows[name] = r
        print(f"triton {triton.__version__} sm_90 {name} grid {grid}: smem {r['smem']} regs {r['regs']} "
              f"spill st/ld {r['spill_st']}/{r['spill_ld']}", flush=True)
    return rows


if __name__ == "__main__":
    main(eval(sys.argv[1]) if len(sys.argv) > 1 else None)
