"""Run the GPU-relevant tests (kernels, their model layers, N:M sparsity) on this machine's GPU and
record the outcome in benchmarks/results/gpu_tests.json (or $OUT/gpu_tests.json).

    python benchmarks/gpu_tests.py [extra pytest args]

On a GPU machine the tests' `device` fixture (root conftest.py) puts every kernel test on CUDA, so
this is the same suite CI runs under the Triton interpreter, here on the real kernels. The commit is
taken from `git rev-parse HEAD`, or from SPARSETRON_COMMIT where the copy has no .git."""

import json
import os
import subprocess
import sys
import time

import pytest

PATHS = ["kernels", "train/sparsity", "train/model/moe", "train/model/sparse_attention"]


class Outcomes:
    def __init__(self):
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}
        self.failures = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            kind = report.outcome if report.outcome in self.counts else "failed"
            self.counts[kind] += 1
            if kind == "failed":
                self.failures.append(report.nodeid)


def commit() -> str:
    if os.environ.get("SPARSETRON_COMMIT"):
        return os.environ["SPARSETRON_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    import torch
    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    outcomes = Outcomes()
    t0 = time.time()
    rc = pytest.main([*PATHS, "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[outcomes])
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
        "commit": commit(), "command": "python benchmarks/gpu_tests.py " + " ".join(sys.argv[1:]),
        "paths": PATHS, **outcomes.counts, "failures": outcomes.failures, "wall_s": round(time.time() - t0, 1),
        "pytest_exit_code": int(rc),
    }
    out_dir = os.environ.get("OUT") or os.path.join(root, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_tests.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}), "failures:", outcomes.failures[:40])
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
