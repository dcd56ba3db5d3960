"""MoE router benchmark (GPU): plain top-k router vs the token-rounding router, the old PyTorch
rounding path (two top-(tile) selections + nonzero: host syncs) and the fused Triton path
(kernels/moe/fused_routing: three launches, no host sync), at the issue's shapes.

Correctness first, on fresh random inputs at every shape: the fused plan's tables equal the
PyTorch reference's exactly, the router's combine weights and stats agree, and the fused router
runs under torch.cuda.set_sync_debug_mode("error") (the old path is checked to sync, as a control).
Then, timed with triton.testing.do_bench (median ms):
  * router forward (no grad) and forward+backward (gradient through the combine weights),
  * the plan alone given the top-k choice: argsort plan (plain), fused plain plan, PyTorch rounding
    plan, fused rounding plan, and a few launch shapes of the fused rounding plan.
Ratios: rounding router / plain router (the issue's goal: fused <= 1.2x).

  python benchmarks/moe_router.py [--out moe_router.json] [--quick]
  python benchmarks/moe_router.py --smoke --out /tmp/r.json   (CPU, interpreter, tiny shapes)
No hydra / deepspeed imports: it runs on the GPU image.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

if not torch.cuda.is_available():  # CPU smoke run: Triton kernels under the interpreter (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `sparsetron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparsetron.kernels.moe.fused_routing import RoutingBlocks, route_tokens  # noqa: E402
from sparsetron.kernels.moe.routing import routing_from_topk  # noqa: E402
from sparsetron.train.model.moe.router import Router  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [  # (tokens, dim, experts, k, tile)
    (16384, 1536, 128, 8, 128),
    (4096, 1536, 128, 8, 128),
    (16384, 4096, 64, 8, 128),
    (16384, 4096, 64, 6, 128),
    (24576, 1536, 128, 8, 128),  # SonicMoE 7B
    (32768, 4096, 256, 16, 128),  # SonicMoE 30B
]
SMOKE_SHAPES = [(150, 32, 12, 2, 16)]
TABLES = ("expert_offsets", "sorted_token", "pair_index", "dest_row", "token_offsets", "topk_counts", "moved_counts")
BLOCK_VARIANTS = {
    "default": RoutingBlocks(),
    "chunk2048": RoutingBlocks(chunk=2048),
    "chunk512_w4": RoutingBlocks(chunk=512, round_warps=4),
    "radix8_chunk256": RoutingBlocks(chunk=256, radix_bits=8),
    "radix2": RoutingBlocks(radix_bits=2),
}
SMOKE_VARIANTS = {  # interpreter-sized
    "default": RoutingBlocks(16, 64, 4, 16, 2, 1, 1, 1),
    "radix8_chunk32": RoutingBlocks(16, 32, 8, 16, 2, 1, 1, 1),
}


def _bench(fn, warmup=25, rep=100):
    if DEV == "cuda":
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _router(d, e, k, tile, rounding, impl="auto"):
    torch.manual_seed(0)
    return Router(d, e, k, load_balancing="aux_loss", token_rounding=rounding, tile_m=tile, routing_implementation=impl).to(DEV)


def _inputs(t, d, e, k, router):
    """x with a Zipf-like expert popularity (uneven loads, as in moe_layer.py's rounding rows), its
    select scores and top-k choice."""
    x = torch.randn(t, d, device=DEV)
    pop = -torch.log1p(torch.arange(e, device=DEV, dtype=torch.float32))
    x = (x + torch.linalg.pinv(router.weight.data.float()) @ pop).bfloat16()
    with torch.no_grad():
        select = (x.float() @ router.weight.float().t()).softmax(-1)
    return x, select, select.topk(k, -1).indices


def _syncs(fn) -> bool:
    """True if fn does a device-to-host sync (CUDA only; None on the CPU)."""
    if DEV != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check(t, d, e, k, tile):
    fused_r, torch_r = _router(d, e, k, tile, True), _router(d, e, k, tile, True, "torch")
    x, select, idx = _inputs(t, d, e, k, fused_r)
    res = {}
    for name, tl in (("plain", 0), ("rounding", tile)):
        got, ref = route_tokens(select, idx, tl), route_tokens(select, idx, tl, "torch")
        res[f"{name}_tables_equal"] = all(torch.equal(getattr(got, n), getattr(ref, n)) for n in TABLES)
    (ra, _, sa), (rb, _, sb) = fused_r(x), torch_r(x)
    res["router_weights_equal"] = torch.equal(ra.sorted_weight, rb.sorted_weight)
    res["router_stats_equal"] = all(torch.equal(sa[n], sb[n]) for n in ("tokens_dropped", "tokens_added", "expert_load"))
    counts = ra.counts
    res["counts_tile_multiples"] = bool((counts % tile == 0).all())
    res["assignments"] = int(counts.sum())
    res["padded_rows"] = ra.num_assignments - res["assignments"]
    res["tokens_moved"] = int(sa["tokens_dropped"] + sa["tokens_added"])
    res["fused_router_syncs"] = _syncs(lambda: fused_r(x))
    res["torch_router_syncs"] = _syncs(lambda: torch_r(x))
    res["ok"] = all(res[n] for n in ("plain_tables_equal", "rounding_tables_equal", "router_weights_equal",
                                      "router_stats_equal", "counts_tile_multiples")) and res["fused_router_syncs"] is not True
    return res


def time_shape(t, d, e, k, tile, variants=None):
    routers = {"plain": _router(d, e, k, tile, False), "rounding_torch": _router(d, e, k, tile, True, "torch"),
               "rounding_fused": _router(d, e, k, tile, True)}
    x, select, idx = _inputs(t, d, e, k, routers["plain"])
    out = {}
    for name, r in routers.items():
        with torch.no_grad():
            fwd = _bench(lambda: r(x))
        xg = x.detach().clone().requires_grad_()

        def fwd_bwd():
            routing, aux, _ = r(xg)
            (routing.sorted_weight.sum() + aux).backward()

        out[name] = dict(router_fwd_ms=fwd, router_fwd_bwd_ms=_bench(fwd_bwd))
    w = select.gather(1, idx)
    plan = {
        "plain_argsort": lambda: routing_from_topk(idx, w, e),
        "plain_fused": lambda: route_tokens(select, idx, 0),
        "rounding_torch": lambda: route_tokens(select, idx, tile, "torch"),
        "rounding_fused": lambda: route_tokens(select, idx, tile),
    }
    out["plan_ms"] = {n: _bench(fn) for n, fn in plan.items()}
    if variants:
        out["fused_rounding_plan_ms_by_blocks"] = {}
        for n, blk in variants.items():
            try:
                out["fused_rounding_plan_ms_by_blocks"][n] = _bench(lambda: route_tokens(select, idx, tile, blocks=blk))
            except Exception as exc:  # a launch shape the compiler refuses is reported, not fatal
                out["fused_rounding_plan_ms_by_blocks"][n] = repr(exc)[:200]
    plain = out["plain"]["router_fwd_ms"]
    out["ratio_vs_plain_fwd"] = {n: out[n]["router_fwd_ms"] / plain for n in ("rounding_torch", "rounding_fused")}
    out["ratio_vs_plain_fwd_bwd"] = {n: out[n]["router_fwd_bwd_ms"] / out["plain"]["router_fwd_bwd_ms"]
                                     for n in ("rounding_torch", "rounding_fused")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_router.json"))
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = ap.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES[:2] if args.quick else SHAPES
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__, "triton": triton.__version__, "router_dtype": "fp32 logits from bf16 x",
        "blocks_default": asdict(RoutingBlocks()), "rows": [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def dump():  # after every shape, so a run cut short still leaves its numbers
        result["elapsed_s"] = time.time() - t0
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    for i, (t, d, e, k, tile) in enumerate(shapes):
        row = {"shape": dict(tokens=t, dim=d, experts=e, k=k, tile=tile)}
        row["check"] = check(t, d, e, k, tile)
        print(f"T={t} d={d} E={e} k={k} tile={tile} check: " + " ".join(f"{n}={v}" for n, v in row["check"].items()), flush=True)
        result["rows"].append(row)
        dump()
        row.update(time_shape(t, d, e, k, tile, variants=(SMOKE_VARIANTS if args.smoke else BLOCK_VARIANTS) if i == 0 else None))
        dump()
    print("\n| T | d | E | k | plain fwd ms | rounding old fwd ms (x) | rounding fused fwd ms (x) | fused fwd+bwd x | "
          "plan ms: argsort / fused plain / old rounding / fused rounding | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        s, p = row["shape"], row["plan_ms"]
        print(f"| {s['tokens']} | {s['dim']} | {s['experts']} | {s['k']} | {row['plain']['router_fwd_ms']:.3f} | "
              f"{row['rounding_torch']['router_fwd_ms']:.3f} ({row['ratio_vs_plain_fwd']['rounding_torch']:.2f}x) | "
              f"{row['rounding_fused']['router_fwd_ms']:.3f} ({row['ratio_vs_plain_fwd']['rounding_fused']:.2f}x) | "
              f"{row['ratio_vs_plain_fwd_bwd']['rounding_fused']:.2f}x | {p['plain_argsort']:.3f} / {p['plain_fused']:.3f} / "
              f"{p['rounding_torch']:.3f} / {p['rounding_fused']:.3f} | {'ok' if row['check']['ok'] else 'FAIL'} |")
    if "fused_rounding_plan_ms_by_blocks" in result["rows"][0]:
        print("fused rounding plan by launch shape (first shape):",
              ", ".join(f"{n} {v:.3f} ms" if isinstance(v, float) else f"{n} {v}" for n, v in result["rows"][0]["fused_rounding_plan_ms_by_blocks"].items()))
    dump()
    print("wrote", args.out)
    return result


if __name__ == "__main__":
    main()
