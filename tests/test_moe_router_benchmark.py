"""The MoE router benchmark's CPU smoke mode (the GPU run is in BENCHMARKS.md)."""


def test_router_benchmark_smoke_runs_without_hydra_or_deepspeed(tmp_path):
    """benchmarks/moe_router.py --smoke (CPU, interpreter, tiny shape) with hydra / deepspeed / megatron
    made unimportable, as on the GPU image: its correctness check passes and every timing is recorded.
    (A subprocess: the benchmark sets TRITON_INTERPRET before Triton loads.)"""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "moe_router.json"
    code = ("import runpy, sys\n"
            "for m in ('hydra', 'omegaconf', 'deepspeed', 'megatron', 'wandb'): sys.modules[m] = None\n"
            f"sys.argv = ['moe_router.py', '--smoke', '--out', {str(out)!r}]\n"
            f"runpy.run_path({os.path.join(root, 'benchmarks', 'moe_router.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU mode even on a GPU machine
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu") and len(res["rows"]) == 1
    row = res["rows"][0]
    assert row["check"]["ok"] and row["check"]["rounding_tables_equal"] and row["check"]["padded_rows"] >= 0
    for name in ("plain", "rounding_torch", "rounding_fused"):
        assert row[name]["router_fwd_ms"] > 0 and row[name]["router_fwd_bwd_ms"] > 0
    assert set(row["plan_ms"]) == {"plain_argsort", "plain_fused", "rounding_torch", "rounding_fused"}
    assert all(isinstance(v, float) for v in row["fused_rounding_plan_ms_by_blocks"].values())
    assert "| 150 | 32 | 12 | 2 |" in proc.stdout
