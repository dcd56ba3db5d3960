"""Measure the machine for the perf model's Cluster: per-rank matmul FLOP/s, memory bandwidth, and
gloo all-reduce latency / bandwidth. Run by run.py for CPU matrices, as the training runs are:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        benchmarks/scaling/probe.py --out probe.json

Every rank measures at the same time (as during training, where they share the machine); rank 0
writes the medians over ranks. All-reduce: t(bytes) = a + bytes / bw fitted by least squares over
4 KiB .. 16 MiB fp32 buffers (relative error); for a 2-rank ring the perf model's time is ring_bytes / bw +
2 (n - 1) latency with ring_bytes = bytes, so latency per ring step = a / 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def _best_of(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / _best_of(lambda: a @ b, reps)


def copy_bandwidth(mib: int = 64, reps: int = 5) -> float:
    """Bytes per second read + written by a large copy (what an optimizer step streams)."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _best_of(lambda: dst.copy_(src), reps)


def all_reduce_fit(reps: int = 9) -> dict:
    sizes = [2**k for k in range(10, 23, 2)]  # fp32 elements: 4 KiB .. 16 MiB
    points = []
    for numel in sizes:
        buf = torch.ones(numel)

        def one():
            dist.all_reduce(buf)

        dist.barrier()
        points.append((numel * 4, _best_of(one, reps)))
    # Least squares on the relative error, sum ((a + b x) / t - 1)^2: linear in (a, b), and each
    # size weighs the same (a plain fit would let the 16 MiB point decide the latency too).
    A = torch.tensor([[1.0 / t, x / t] for x, t in points], dtype=torch.float64)
    sol = torch.linalg.lstsq(A, torch.ones(len(points), 1, dtype=torch.float64)).solution.flatten()
    latency, per_byte = max(float(sol[0]), 0.0), float(sol[1])
    return {"points": [{"bytes": x, "seconds": t} for x, t in points], "latency_s": latency,
            "bytes_per_s": 1.0 / per_byte if per_byte > 0 else float("inf"),
            "fit": "t = latency_s + bytes / bytes_per_s"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    local = {"matmul_flops": matmul_flops(), "copy_bytes_per_s": copy_bandwidth()}
    result = {"world": world, "threads_per_rank": torch.get_num_threads()}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        local = {k: statistics.median(g[k] for g in gathered) for k in local}
        result["all_reduce"] = all_reduce_fit()
        dist.barrier()
    result.update(local)
    if world == 1 or dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
