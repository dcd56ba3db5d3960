"""GPU run of the foundation (issue 2): the default job and the 125M model, bf16, through the real
CLI. Reports tokens/s and MFU (median over steps after warm-up) to benchmarks/results/foundation.json.

    python benchmarks/foundation.py --out benchmarks/results/foundation.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

RUNS = {
    # the README's default job, unchanged except where it writes
    "default_job_tiny": [],
    # GPT-3-small-sized Llama, seq 1024, bf16 autocast, fused AdamW
    "125m": ["experiment=gpu_125m", "train.max_steps=60", "train.eval_every=60"],
    "125m_fused_kernels": ["experiment=gpu_125m", "train.max_steps=60", "train.eval_every=60",
                           "model.fused_kernels=true"],
}


def run(name, overrides, root):
    run_dir = os.path.join(root, name)
    cmd = [sys.executable, "-m", "sparsetron.train", f"run_dir={run_dir}", "logging.wandb.mode=disabled",
           "logging.progress_bar=false", "checkpoint.every=0", *overrides]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        return {"error": proc.stderr[-2000:], "cmd": " ".join(cmd)}
    train, val = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            (train if r["kind"] == "train" else val).append(r)
    steady = train[len(train) // 5:]  # skip warm-up (compilation, allocator growth)
    return {
        "overrides": overrides,
        "steps": len(train),
        "wall_s": round(wall, 1),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu_median": statistics.median(r.get("mfu", 0.0) for r in steady),
        "peak_mem_gib": max(r["mem_gib"] for r in train),
        "first_val_loss": val[0]["loss"] if val else None,
        "final_val_loss": val[-1]["loss"] if val else None,
        "final_train_loss": train[-1]["loss"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/foundation.json")
    ap.add_argument("--only", nargs="*", default=list(RUNS))
    args = ap.parse_args()
    results = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "mfu_peak_flops": "989e12 (H100/H200 SXM dense bf16 datasheet); PaLM 6N + 12*L*d*S per token",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as root:
        for name in args.only:
            results["runs"][name] = run(name, RUNS[name], root)
            print(name, json.dumps(results["runs"][name]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"{'run':24s} {'tok/s':>10s} {'MFU':>6s} {'mem GiB':>8s} {'val loss':>16s}")
    for name, r in results["runs"].items():
        if "error" in r:
            print(f"{name:24s} ERROR {r['error'][-300:]}")
            continue
        print(f"{name:24s} {r['tokens_per_s_median']:10.0f} {r['mfu_median']:6.1%} {r['peak_mem_gib']:8.2f} "
              f"{r['first_val_loss']:.3f}->{r['final_val_loss']:.3f}")


if __name__ == "__main__":
    main()
