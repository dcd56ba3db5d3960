"""MoE layer benchmark (GPU): Triton tile-schedule kernels vs (a) argsort + torch._grouped_mm and
(b) the per-expert loop, whole layer (router + experts), bf16, forward and forward+backward.

TFLOP/s counts the expert GEMMs only: 6*A*d*ffn forward (A = routed assignments, T*k for plain
top-k) and 3x that for forward+backward. Also: time, peak memory, activation bytes per token
(memory held between forward and backward), and token rounding vs plain top-k at a skewed routing.

  python benchmarks/moe_layer.py [--out moe.json] [--quick] [--sweep]
  (or python -m sparsetron.benchmarks.moe_layer; it benchmarks the model layer, so it lives here and
  not in kernels/moe/, which imports nothing above the kernels)
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

if __package__ in (None, ""):  # run as a script: make `sparsetron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparsetron.kernels.moe.function import default_blocks, moe_experts  # noqa: E402
from sparsetron.kernels.moe.grouped_mm_anchor import grouped_mm_available, moe_experts_grouped_mm  # noqa: E402
from sparsetron.kernels.moe.reference import moe_experts_reference  # noqa: E402
from sparsetron.train.model.moe.router import Router  # noqa: E402

SHAPES = [  # (tokens, dim, ffn, experts, k): SonicMoE / ScatterMoE settings
    (16384, 1536, 256, 128, 8),
    (16384, 4096, 1024, 64, 8),
    (16384, 4096, 2048, 64, 6),
]
CHECK_SHAPE = (3000, 1024, 384, 24, 4)  # ragged: 3000*4/24 = 500 rows per expert on average
ROUNDING = [(16384, 1536, 256, 128, 8, 1.0), (4096, 1536, 256, 128, 8, 1.0)]  # (..., skew)


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --smoke only (interpreter, tiny shapes)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _allocated():
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def _bench(fn, warmup, rep, grad_to_none=None):
    if DEV == "cuda":
        return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class Layer(torch.nn.Module):
    def __init__(self, d, f, e, k, impl, token_rounding=False, blocks=None):
        super().__init__()
        self.router = Router(d, e, k, load_balancing="aux_loss", token_rounding=token_rounding, tile_m=128)
        self.w1 = torch.nn.Parameter(torch.randn(e, 2 * f, d) * d**-0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, d, f) * f**-0.5)
        self.impl, self.blocks = impl, blocks

    def forward(self, x):
        routing, aux, _ = self.router(x)
        if self.impl == "triton":
            y = moe_experts(x, self.w1, self.w2, routing, "triton", blocks=self.blocks)
        elif self.impl == "grouped_mm":
            y = moe_experts_grouped_mm(x, self.w1, self.w2, routing)
        else:
            y = moe_experts_reference(x, self.w1, self.w2, routing)
        return y, aux, routing


def _make(d, f, e, k, impl, dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    layer = Layer(d, f, e, k, impl, **kw).to(DEV)
    layer.w1.data = layer.w1.data.to(dtype)
    layer.w2.data = layer.w2.data.to(dtype)
    return layer


def _skewed_input(t, d, e, skew, layer, dtype):
    """x whose router logits get an extra -skew * log(1 + j) for expert j (Zipf-like popularity)."""
    x = torch.randn(t, d, device=DEV)
    if skew:
        pop = -skew * torch.log1p(torch.arange(e, device=DEV, dtype=torch.float32))
        x = x + torch.linalg.pinv(layer.router.weight.data.float()) @ pop
    return x.to(dtype)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_correctness():
    """Fresh random inputs at a mid-size ragged shape: bf16 layers vs the fp32 per-expert loop run on
    the same bf16-rounded x and weights (so routing is identical and only arithmetic differs)."""
    t, d, f, e, k = CHECK_SHAPE
    res = {}
    ref = _make(d, f, e, k, "torch", dtype=torch.float32)
    ref.w1.data = ref.w1.data.bfloat16().float()
    ref.w2.data = ref.w2.data.bfloat16().float()
    x = torch.randn(t, d, device=DEV).bfloat16().float()
    dy = torch.randn(t, d, device=DEV)
    xr = x.clone().requires_grad_()
    yr, _, _ = ref(xr)
    (yr * dy).sum().backward()
    impls = ["triton"] + (["grouped_mm"] if grouped_mm_available(torch.device(DEV), torch.bfloat16) else [])
    for impl in impls:
        m = _make(d, f, e, k, impl)
        m.load_state_dict({n: v.to(m.state_dict()[n].dtype) for n, v in ref.state_dict().items()})
        xb = x.bfloat16().requires_grad_()
        y, _, _ = m(xb)
        (y.float() * dy).sum().backward()
        errs = {
            "out": rel(y, yr), "dx": rel(xb.grad, xr.grad), "dw_gate_up": rel(m.w1.grad, ref.w1.grad),
            "dw_down": rel(m.w2.grad, ref.w2.grad), "drouter": rel(m.router.weight.grad, ref.router.weight.grad),
        }
        errs["ok"] = all(v < 2e-2 for v in errs.values())
        res[impl] = errs
        print(f"check {impl:10s} " + " ".join(f"{n}={v:.2e}" for n, v in errs.items() if n != "ok") + f" ok={errs['ok']}", flush=True)
    return res


def measure(layer, x, dy, warmup=25, rep=100):
    def fwd():
        return layer(x)[0]

    def fwd_bwd():
        y, aux, _ = layer(x)
        torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])

    xg = x.requires_grad_()
    fwd_bwd()  # compile / warm up
    _sync()
    t_fwd = _bench(fwd, warmup, rep)
    t_fb = _bench(fwd_bwd, warmup, rep, grad_to_none=[xg] + list(layer.parameters()))
    # memory: what stays allocated from forward into backward, and the fwd+bwd peak
    for p in layer.parameters():
        p.grad = None
    xg.grad = None
    _sync()
    base = _allocated()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    y, aux, routing = layer(x)
    _sync()
    held = _allocated() - base - y.numel() * y.element_size()
    torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
    _sync()
    peak = (torch.cuda.max_memory_allocated() if DEV == "cuda" else 0) - base
    assignments = int(routing.counts.sum())  # the real rows (a token-rounded plan is padded to a static size)
    del y, aux, routing
    return t_fwd, t_fb, held, peak, assignments


def run_shape(t, d, f, e, k, impls, blocks=None):
    out = {"shape": dict(tokens=t, dim=d, ffn=f, experts=e, k=k)}
    dy = torch.randn(t, d, device=DEV, dtype=torch.bfloat16)
    for impl in impls:
        layer = _make(d, f, e, k, impl, blocks=blocks)
        x = torch.randn(t, d, device=DEV, dtype=torch.bfloat16)
        t_fwd, t_fb, held, peak, a = measure(layer, x, dy)
        flops = 6 * a * d * f
        out[impl] = dict(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, fwd_tflops=flops / t_fwd * 1e-9, fwd_bwd_tflops=3 * flops / t_fb * 1e-9,
                         activation_bytes_per_token=held / t, peak_mem_gb=peak / 2**30)
        print(f"  {impl:10s} fwd {t_fwd:7.3f} ms {out[impl]['fwd_tflops']:6.1f} TF/s | fwd+bwd {t_fb:7.3f} ms "
              f"{out[impl]['fwd_bwd_tflops']:6.1f} TF/s | act {held / t:8.0f} B/tok | peak {peak / 2**30:6.2f} GiB", flush=True)
        del layer, x
        if DEV == "cuda":
            torch.cuda.empty_cache()
    if "triton" in out and "grouped_mm" in out:
        out["speedup_vs_grouped_mm"] = dict(
            fwd=out["grouped_mm"]["fwd_ms"] / out["triton"]["fwd_ms"],
            fwd_bwd=out["grouped_mm"]["fwd_bwd_ms"] / out["triton"]["fwd_bwd_ms"],
            activation_ratio=out["triton"]["activation_bytes_per_token"] / out["grouped_mm"]["activation_bytes_per_token"],
        )
    return out


def split_router_and_experts(layer, x, dy, warmup=25, rep=100):
    """Where a rounded layer's time goes: the router alone (top-k, rounding, routing tables) and the
    expert kernels alone on a precomputed routing, forward and forward+backward (ms)."""
    with torch.no_grad():
        router_ms = _bench(lambda: layer.router(x), warmup, rep)
        routing = layer.router(x)[0]
    xg = x.detach().requires_grad_()

    def experts():
        return moe_experts(xg, layer.w1, layer.w2, routing, "triton", blocks=layer.blocks)

    def experts_fwd_bwd():
        experts().backward(dy)

    with torch.no_grad():
        experts_fwd = _bench(experts, warmup, rep)
    experts_fb = _bench(experts_fwd_bwd, warmup, rep, grad_to_none=[xg, layer.w1, layer.w2])
    return dict(router_fwd_ms=router_ms, experts_fwd_ms=experts_fwd, experts_fwd_bwd_ms=experts_fb)


def run_rounding(t, d, f, e, k, skew):
    """Plain top-k vs token rounding (tile 128) on the same skewed inputs, Triton layer, fwd+bwd."""
    res = {"shape": dict(tokens=t, dim=d, ffn=f, experts=e, k=k, skew=skew)}
    dy = torch.randn(t, d, device=DEV, dtype=torch.bfloat16)
    for name, tr in (("topk", False), ("token_rounding", True)):
        layer = _make(d, f, e, k, "triton", token_rounding=tr)
        x = _skewed_input(t, d, e, skew, layer, torch.bfloat16)
        with torch.no_grad():
            counts = layer(x)[2].counts
        tiles = int(((counts + 127) // 128).sum())
        t_fwd, t_fb, _, _, a = measure(layer, x, dy)
        split = split_router_and_experts(layer, x.detach(), dy)
        res[name] = dict(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, assignments=a, m_tiles=tiles,
                         experts_per_token=a / t, max_load=int(counts.max()), min_load=int(counts.min()), **split)
        print(f"  {name:15s} fwd {t_fwd:7.3f} ms fwd+bwd {t_fb:7.3f} ms  tiles {tiles} A/T {a / t:.3f} "
              f"load [{int(counts.min())}, {int(counts.max())}]  router {split['router_fwd_ms']:.3f} ms, experts "
              f"fwd {split['experts_fwd_ms']:.3f} / fwd+bwd {split['experts_fwd_bwd_ms']:.3f} ms", flush=True)
    res["speedup_fwd_bwd"] = res["topk"]["fwd_bwd_ms"] / res["token_rounding"]["fwd_bwd_ms"]
    res["speedup_fwd"] = res["topk"]["fwd_ms"] / res["token_rounding"]["fwd_ms"]
    return res


def sweep(t, d, f, e, k, res, dump):
    """Time a few tile configurations of the Triton layer at one shape (to pick defaults)."""
    base = default_blocks(torch.bfloat16)
    variants = {
        "up64w4s4": replace(base, up_n=64, up_warps=4, up_stages=4),
        "mm256": replace(base, mm_n=256, mm_stages=3),
        "mm128s4": replace(base, mm_warps=4, mm_stages=4),
        "wg_k32s4": replace(base, wg_k=32, wg_stages=4),
        "up_s4": replace(base, up_stages=4, mm_stages=4, wg_stages=4),
    }
    dy = torch.randn(t, d, device=DEV, dtype=torch.bfloat16)
    for name, blk in variants.items():
        try:
            layer = _make(d, f, e, k, "triton", blocks=blk)
            x = torch.randn(t, d, device=DEV, dtype=torch.bfloat16)
            t_fwd, t_fb, _, _, _ = measure(layer, x, dy, warmup=5, rep=20)
            res[name] = dict(fwd_ms=t_fwd, fwd_bwd_ms=t_fb)
            print(f"  sweep {name:10s} fwd {t_fwd:7.3f} fwd+bwd {t_fb:7.3f}", flush=True)
        except Exception as exc:  # an over-large config (shared memory) is skipped, not fatal
            res[name] = dict(error=repr(exc)[:200])
            print(f"  sweep {name:10s} failed: {exc!r}"[:200], flush=True)
        dump()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "moe.json"))
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-expert loop anchor")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: exercise the script on CPU (interpreter)")
    args = ap.parse_args()
    global SHAPES, CHECK_SHAPE, ROUNDING
    if args.smoke:
        SHAPES = [(100, 64, 32, 4, 2)]
        CHECK_SHAPE = (60, 64, 48, 5, 2)
        ROUNDING = [(300, 64, 32, 8, 2, 1.0)]
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke run)", "torch": torch.__version__, "triton": triton.__version__,
        "dtype": "bfloat16", "flops": "6*A*d*ffn fwd, 3x for fwd+bwd (A = assignments)",
        "blocks": default_blocks(torch.bfloat16).__dict__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def dump():  # after every stage, so a run cut short still leaves its numbers
        result["elapsed_s"] = time.time() - t0
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    result["correctness"] = check_correctness()
    dump()
    impls = ["triton"] + (["grouped_mm"] if grouped_mm_available(torch.device(DEV), torch.bfloat16) else [])
    if not args.no_loop:
        impls.append("loop")
    result["shapes"] = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        print(f"shape T,d,ffn,E,k = {shape}", flush=True)
        result["shapes"].append(run_shape(*shape, impls))
        dump()
    print("token rounding (skewed routing)", flush=True)
    result["token_rounding"] = [run_rounding(*r) for r in ROUNDING]
    dump()
    if args.sweep:
        result["sweep"] = {}
        sweep(*SHAPES[0], result["sweep"], dump)
    result["elapsed_s"] = time.time() - t0
    print("\n| T | d | ffn | E | k | impl | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | act B/tok | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in result["shapes"]:
        sh = s["shape"]
        for impl in impls:
            r = s[impl]
            print(f"| {sh['tokens']} | {sh['dim']} | {sh['ffn']} | {sh['experts']} | {sh['k']} | {impl} | {r['fwd_ms']:.3f} | "
                  f"{r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} | {r['activation_bytes_per_token']:.0f} | {r['peak_mem_gb']:.2f} |")
    dump()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
