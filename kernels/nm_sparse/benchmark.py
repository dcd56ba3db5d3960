"""Benchmark N:M sparse linear pieces against dense anchors (GPU; `--smoke` runs tiny CPU shapes).

Measured per weight shape (bf16 on GPU, x = tokens x in):
  dense        F.linear(x, W)                                    anchor
  masked       F.linear(x, W * M)                                the fallback path
  packed_fwd   F.linear(x, W~ packed) with W~ packed once        inference
  train_fwd    nm_linear forward incl. packing (weights change every step)
  train_step   nm_linear forward + backward vs dense forward + backward
  mask         nm_mask Triton vs the sort-based reference

Usage: python -m sparsetron.kernels.nm_sparse.benchmark [--smoke] [--out results.json]
Correctness is checked first on fresh random inputs; the table prints last.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from . import nm_linear, nm_mask, nm_mask_reference, pack_2to4, semi_structured_unavailable

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in), Llama-7B q/o, gate/up, down
SMOKE_SHAPES = [(64, 128)]


def bench(fn, smoke):
    if smoke:
        fn()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        return (time.perf_counter() - t) / 5 * 1e3
    import triton.testing

    return triton.testing.do_bench(fn)  # median ms


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(smoke: bool, tokens: int):
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for out_f, in_f in SMOKE_SHAPES if smoke else GPU_SHAPES:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f, device=device, dtype=dtype, requires_grad=True)
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        mask = nm_mask(w, 2, 4)
        assert torch.equal(mask, nm_mask_reference(w.detach().abs(), 2, 4)), "mask kernel != reference"
        ref = F.linear(x.float(), (w * mask).float())
        y = nm_linear(x, w, mask, n=2, m=4, mode="srste", backend="packed")
        err = rel(y, ref)
        assert err < 1e-2, f"nm_linear forward rel err {err}"
        fast = semi_structured_unavailable(x.device, dtype, w.shape, 2, 4) is None
        wm = (w * mask).detach()
        packed = pack_2to4(wm) if fast else None
        gy = torch.randn_like(y)
        r = {"shape": [out_f, in_f], "tokens": tokens, "fwd_rel_err": err, "semi_structured": fast}
        with torch.no_grad():
            r["dense_ms"] = bench(lambda: F.linear(x, w), smoke)
            r["masked_ms"] = bench(lambda: F.linear(x, w * mask), smoke)
            if fast:
                r["packed_fwd_ms"] = bench(lambda: F.linear(x, packed), smoke)
                r["pack_ms"] = bench(lambda: pack_2to4(wm), smoke)
            r["train_fwd_ms"] = bench(lambda: nm_linear(x, w, mask, n=2, m=4, backend="packed"), smoke)

        def dense_step():
            F.linear(x, w).backward(gy)

        def sparse_step():
            nm_linear(x, w, mask, n=2, m=4, backend="packed").backward(gy)

        r["dense_step_ms"] = bench(dense_step, smoke)
        r["nm_step_ms"] = bench(sparse_step, smoke)
        r["mask_ms"] = bench(lambda: nm_mask(w, 2, 4), smoke)
        r["mask_ref_ms"] = bench(lambda: nm_mask_reference(w.detach().abs(), 2, 4), smoke)
        flops = 2 * tokens * in_f * out_f
        r["dense_tflops"] = flops / r["dense_ms"] / 1e9
        if fast:
            r["packed_speedup"] = r["dense_ms"] / r["packed_fwd_ms"]
        rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every path (no timing value)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmark needs a GPU; use --smoke on CPU")
    tokens = args.tokens or (16 if args.smoke else 8192)
    rows = run(args.smoke, tokens)
    meta = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = ["dense_ms", "masked_ms", "packed_fwd_ms", "pack_ms", "train_fwd_ms", "dense_step_ms", "nm_step_ms", "mask_ms", "mask_ref_ms"]
    print(meta)
    print(f"{'shape':>12} " + " ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} " + " ".join(f"{r[c]:>13.3f}" if c in r else f"{'-':>13}" for c in cols))


if __name__ == "__main__":
    main()
