"""sm_90 compile check of the sparse-attention kernels WITHOUT a GPU, with the same argument
specialization the JIT applies at a real launch (16-byte-aligned pointers / ints divisible by 16
get tt.divisibility=16, ints == 1 become constexpr). The arguments come from function.py's own
launch code (kernels are swapped for a recorder), on the benchmark's shape class: bf16, D=128,
block 64, 32 query heads, 8 KV heads (S=1024 stands in for 32K: same divisibility).

usage: python -m sparsetron.kernels.sparse_attention.compile_check [fwd|dq|bwd|all] ["[(sub, warps, stages[, heads[, ...]]), ...]"]
Prints per config: smem bytes, regs (cuobjdump, = ptxas), spill store/load bytes (ptxas -v log), async copies in TTGIR,
cp.async count in PTX, number of multi-buffered smem allocations in the loop.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spill bytes
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # so ptxas runs (and logs) every time
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import sparsetron.kernels.sparse_attention.function as F

TARGET = GPUTarget("cuda", 90, 128)
BACKEND = make_backend(TARGET)
CAPTURED = {}


class Recorder:
    def __init__(self, name, kern):
        self.name, self.kern = name, kern

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            CAPTURED[self.name] = (self.kern, args, kwargs)
        return call


def capture(hq=32, hkv=8, s=1024, d=128, block=64, window=None, varlen=False, sel=16, dtype=torch.bfloat16):
    torch.manual_seed(0)
    z = 1 if varlen else 2
    q = torch.randn(z, hq, s, d, dtype=dtype)
    k = torch.randn(z, hkv, s, d, dtype=dtype)
    v = torch.randn(z, hkv, s, d, dtype=dtype)
    nb = (s // 2 if varlen else s) // block  # blocks per sequence
    n_seq = 2 if varlen else z
    idx = torch.randint(0, nb, (n_seq, hkv, nb, sel), dtype=torch.int32)
    cnt = torch.full((n_seq, hkv, nb), sel, dtype=torch.int32)
    cu = torch.tensor([0, s // 2, s], dtype=torch.int32) if varlen else None
    saved = F._fwd_kernel, F._bwd_dq_kernel, F._bwd_dkdv_kernel, F._dkdv_reduce_kernel
    F._fwd_kernel, F._bwd_dq_kernel, F._bwd_dkdv_kernel, F._dkdv_reduce_kernel = (
        Recorder("fwd", saved[0]), Recorder("dq", saved[1]), Recorder("bwd", saved[2]), Recorder("reduce", saved[3]))
    try:
        o, lse = F._forward(q, k, v, idx, cnt, block, cu, cu, window, d ** -0.5, 1, 0)
        lse.zero_()
        F._backward(q, k, v, o, lse, torch.randn_like(o), idx, cnt, block, cu, cu, window, d ** -0.5, 1, 0, False)
    finally:
        F._fwd_kernel, F._bwd_dq_kernel, F._bwd_dkdv_kernel, F._dkdv_reduce_kernel = saved


def compile_captured(name, sub, warps, stages, heads=1, extra=None):
    kern, args, kwargs = CAPTURED[name]
    kwargs = dict(kwargs, num_warps=warps, num_stages=stages, HEADS_PER_PROGRAM=heads)
    kwargs["BLOCK_M" if name == "bwd" else "BLOCK_N"] = sub
    for key, val in (extra or {}).items():
        kwargs[key] = val
    kwargs = {k: v for k, v in kwargs.items() if k in kern.arg_names or k in ("num_warps", "num_stages")}
    binder = create_function_from_signature(kern.signature, kern.params, BACKEND)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kern._pack_args(BACKEND, kwargs, bound, spec, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    k.ptxas_log = log.getvalue()
    return k


def report(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    bindir = os.path.dirname(triton.backends.nvidia.__file__) + "/bin"
    res = subprocess.run([bindir + "/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", res).group(1)
    local = re.search(r"LOCAL:(\d+)", res).group(1)
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    # multi-buffered allocations: ttg.local_alloc of a memdesc whose leading dim is the buffer count
    bufs = re.findall(r"ttg.local_alloc : \(\) -> !ttg.memdesc<(\d+)x(\d+)x(\d+)x(\w+)", ttgir)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", k.ptxas_log)
    ptxas_regs = re.search(r"Used (\d+) registers", k.ptxas_log)
    assert ptxas_regs and int(ptxas_regs.group(1)) == int(regs), k.ptxas_log
    return dict(smem=k.metadata.shared, regs=int(regs), local_bytes=int(local), spill_st=int(spill.group(1)), spill_ld=int(spill.group(2)),
                async_copy=ttgir.count("ttg.async_copy_global_to_local"),
                tma=ttgir.count("async_tma_copy_global_to_local") + ttgir.count("ttng.async_tma"),
                cp_async_ptx=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                ld_global_b16=ptx.count("ld.global.b16"), ld_global_v=len(re.findall(r"ld\.global[\.\w]*\.v[248]", ptx)),
                tile_buffers=[f"{a}x{b}x{c}{t}" for a, b, c, t in bufs])


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    cfgs = eval(sys.argv[2]) if len(sys.argv) > 2 else None
    shape = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
    capture(**shape)
    default = {"fwd": [(64, 4, 3), (64, 4, 1), (64, 8, 3, 2)], "dq": [(64, 4, 3), (64, 4, 1), (64, 8, 3, 2)],
               "bwd": [(64, 8, 3), (64, 8, 1), (64, 8, 3, 2)]}
    for name in (["fwd", "dq", "bwd"] if which == "all" else [which]):
        for cfg in cfgs or default[name]:
            try:
                k = compile_captured(name, *cfg)
                r = report(k)
                print(f"triton {triton.__version__} {name}{tuple(cfg)}: smem {r['smem']} regs {r['regs']} spill st/ld "
                      f"{r['spill_st']}/{r['spill_ld']} async_copy(ttgir) {r['async_copy']} cp.async(ptx) {r['cp_async_ptx']} "
                      f"buffers {r['tile_buffers']}", flush=True)
            except Exception as e:
                print(f"triton {triton.__version__} {name}{tuple(cfg)}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
