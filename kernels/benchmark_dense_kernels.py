"""GPU benchmark of the dense-path kernels (RMSNorm, RoPE, SwiGLU, linear-CE) against the eager
PyTorch reference and torch.compile of that reference, measured in the same run.

Each kernel folder's benchmark.py defines `cases(device)` -> list of `Case`; this script checks
each Triton result against eager on fresh random inputs first (forward and every gradient),
then times forward (grad enabled, as in training) and forward+backward with
triton.testing.do_bench (median), records peak memory of one fwd+bwd, and writes
benchmarks/results/dense_kernels.json (or --out). Usage:

    python -m sparsetron.kernels.benchmark_dense_kernels [--out PATH] [--only rmsnorm,rope] [--no-compile]
"""

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    kernel: str  # folder name
    name: str  # short label of the configuration
    shapes: Dict[str, object]
    make_inputs: Callable[[], List[torch.Tensor]]  # fresh tensors; float ones that need grad have requires_grad
    impls: Dict[str, Callable]  # "triton" and "eager" required; "compile" is added here
    tol: float  # max relative error of triton vs eager (forward and every gradient)
    bytes_fwd: Optional[float] = None  # ideal HBM traffic, for GB/s
    bytes_fwd_bwd: Optional[float] = None
    flops_fwd: Optional[float] = None  # for TFLOP/s
    flops_fwd_bwd: Optional[float] = None
    notes: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fwd_bwd(fn, inputs, grad_outs=None):
    outs = _outputs(fn(*inputs))
    if grad_outs is None:
        gen = torch.Generator(device=outs[0].device).manual_seed(123)
        grad_outs = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, grad_outs)
    return outs, list(grads), grad_outs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(case: Case) -> Dict[str, float]:
    inputs = case.make_inputs()
    ref_outs, ref_grads, grad_outs = _fwd_bwd(case.impls["eager"], inputs)
    outs, grads, _ = _fwd_bwd(case.impls["triton"], inputs, grad_outs)
    errs = {}
    for i, (a, b) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        label = f"out{i}" if i < len(outs) else f"grad{i - len(outs)}"
        if not torch.isfinite(a).all():
            raise AssertionError(f"{case.kernel}/{case.name}: non-finite {label}")
        errs[label] = _rel_err(a, b)
        if errs[label] > case.tol:
            raise AssertionError(f"{case.kernel}/{case.name}: {label} rel err {errs[label]:.2e} > {case.tol:.0e}")
    return errs


def time_case(case: Case, use_compile: bool, warmup_ms: int = 10, rep_ms: int = 60) -> Dict[str, dict]:
    from triton.testing import do_bench

    impls = dict(case.impls)
    if use_compile:
        impls["compile"] = torch.compile(case.impls["eager"], dynamic=False)
    inputs = case.make_inputs()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    results = {}
    for label, fn in impls.items():
        t0 = time.perf_counter()
        outs = _outputs(fn(*inputs))  # first calls compile (Triton JIT / inductor): not timed
        grad_outs = [torch.randn_like(o) for o in outs]

        def fwd():
            return fn(*inputs)

        def fwd_bwd():
            torch.autograd.backward(_outputs(fn(*inputs)), grad_outs)

        fwd_bwd()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        del outs
        ms_fwd = do_bench(fwd, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves)
        ms_fwd_bwd = do_bench(fwd_bwd, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves)
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        for t in leaves:
            t.grad = None
        r = {"ms_fwd": ms_fwd, "ms_fwd_bwd": ms_fwd_bwd, "peak_extra_mib_fwd_bwd": peak_mib, "first_call_s": warm_s}
        if case.bytes_fwd:
            r["gbps_fwd"] = case.bytes_fwd / ms_fwd / 1e6
        if case.bytes_fwd_bwd:
            r["gbps_fwd_bwd"] = case.bytes_fwd_bwd / ms_fwd_bwd / 1e6
        if case.flops_fwd:
            r["tflops_fwd"] = case.flops_fwd / ms_fwd / 1e9
        if case.flops_fwd_bwd:
            r["tflops_fwd_bwd"] = case.flops_fwd_bwd / ms_fwd_bwd / 1e9
        results[label] = r
    for base_label in ("eager", "compile"):
        if base_label in results:
            for key in ("ms_fwd", "ms_fwd_bwd"):
                results["triton"][f"speedup_{key[3:]}_vs_{base_label}"] = results[base_label][key] / results["triton"][key]
    return results


def _all_cases(device, only):
    from .linear_cross_entropy import benchmark as lce_bench
    from .rmsnorm import benchmark as rms_bench
    from .rope import benchmark as rope_bench
    from .swiglu import benchmark as swiglu_bench

    # linear-CE first: its torch.compile anchor matters most if --compile-deadline-s cuts anchors short
    modules = {"linear_cross_entropy": lce_bench, "rmsnorm": rms_bench, "swiglu": swiglu_bench, "rope": rope_bench}
    cases = []
    for name, module in modules.items():
        if not only or name in only:
            cases += module.cases(device)
    return cases


def main(cases: Optional[List[Case]] = None, argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "benchmarks", "results", "dense_kernels.json"))
    parser.add_argument("--only", default="", help="comma-separated kernel folders (default: all four)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile anchor")
    parser.add_argument("--compile-deadline-s", type=float, default=1e9,
                        help="skip torch.compile anchors once this many seconds have passed (keeps a time-limited run inside its limit)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_dense_kernels needs a CUDA GPU")
    import triton

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs stay fp32 for every implementation
    start = time.perf_counter()
    only = {s for s in args.only.split(",") if s}
    cases = cases if cases is not None else _all_cases(device, only)
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": "triton.testing.do_bench median ms; fwd runs with grad enabled (training forward)",
        "results": [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for case in cases:
        torch.manual_seed(0)
        entry = {"kernel": case.kernel, "case": case.name, "shapes": case.shapes, "notes": case.notes, **case.extra}
        entry["max_rel_err_vs_eager"] = check_case(case)
        use_compile = not args.no_compile and time.perf_counter() - start < args.compile_deadline_s
        entry["compile_anchor"] = use_compile
        entry["timings"] = time_case(case, use_compile)
        report["results"].append(entry)
        with open(args.out, "w") as f:  # rewritten after every case so a cut-off run keeps what it has
            json.dump(report, f, indent=2)
        torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - start:6.1f}s] {case.kernel}/{case.name} done", flush=True)
    _print_table(report)
    return report


def _print_table(report: dict) -> None:
    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}")
    print(f"{'kernel/case':38s} {'impl':8s} {'fwd ms':>8s} {'f+b ms':>8s} {'GB/s f+b':>9s} {'TF/s f+b':>9s} {'peak MiB':>9s}")
    for e in report["results"]:
        for impl, r in e["timings"].items():
            gbps = f"{r['gbps_fwd_bwd']:.0f}" if "gbps_fwd_bwd" in r else "-"
            tf = f"{r['tflops_fwd_bwd']:.0f}" if "tflops_fwd_bwd" in r else "-"
            print(f"{e['kernel'] + '/' + e['case']:38s} {impl:8s} {r['ms_fwd']:8.3f} {r['ms_fwd_bwd']:8.3f} "
                  f"{gbps:>9s} {tf:>9s} {r['peak_extra_mib_fwd_bwd']:9.0f}")


if __name__ == "__main__":
    main()
