"""Scaling benchmark harness: run a matrix of parallel layouts, collect, plot, calibrate the perf model.

    python benchmarks/scaling/run.py --matrix cpu_smoke --out benchmarks/results/scaling_cpu.json

For every layout of the matrix (matrices.py) it launches the real training CLI, one process group
per layout: `python -m torch.distributed.run --standalone --nproc-per-node=W -m sparsetron.train
<overrides>` (`python -m sparsetron.train` for W = 1), with SPARSETRON_COMM_TIMER=1 so every step
logs the seconds spent in communication. From each run directory (collect.py) it takes the
medians over steady steps of step time, tokens/s, MFU and comm seconds, and the peak memory.
It then writes one JSON (device, versions, layouts, per-run metrics, scaling tables, perf-model
calibration), weak / strong scaling PNGs next to it, and prints a table last.

CPU matrices first probe the machine (probe.py: matmul FLOP/s, copy bandwidth, gloo all-reduce
latency and bandwidth) to build the perf model's Cluster. MFU is the trainer's: against the GPU's
datasheet bf16 peak, or `--peak-tflops` (passed on as logging.peak_tflops); none on CPU unless given. Then perf_model.calibrate fits compute and communication efficiency to the measured
step times and the JSON records predicted vs measured per layout.

Why one launch per layout and not one Hydra multirun: README.md in this folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import collect  # noqa: E402
import matrices  # noqa: E402
import plots  # noqa: E402
import scaling_math  # noqa: E402

STACK_DUMP_SIGNAL = signal.SIGUSR2  # = sparsetron.train.resilience.STACK_DUMP_SIGNAL (workers dump stacks on it)
FP32_BYTES_SCALE = 0.5  # the perf model counts bf16 (2-byte) elements; CPU runs move fp32 (4 bytes)


# ----------------------------------------------------------------------------------- launching
def launch_command(layout: matrices.Layout) -> List[str]:
    if layout.world == 1:
        return [sys.executable, "-m", "sparsetron.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout.world}",
            "-m", "sparsetron.train"]


def run_overrides(matrix: matrices.Matrix, layout: matrices.Layout, run_dir: str,
                  peak_tflops: Optional[float] = None) -> List[str]:
    peak = [f"logging.peak_tflops={peak_tflops}"] if peak_tflops else []
    return [*matrix.base, *layout.overrides(), f"train.max_steps={layout.steps or matrix.steps}",
            f"name=scaling-{matrix.name}-{layout.name}", f"hydra.run.dir={run_dir}", *peak]


def run_env(matrix: matrices.Matrix, comm_timer: bool, layout: Optional[matrices.Layout] = None) -> dict:
    if layout is not None and layout.comm_timer is not None:
        comm_timer = layout.comm_timer
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPARSETRON_COMM_TIMER": "1" if comm_timer else "0",
           **(dict(layout.env) if layout is not None else {})}
    if matrix.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one core per rank: ranks must not fight over the cores
    return env


def validate_matrix(matrix: matrices.Matrix, layouts) -> None:
    """Every layout through the config schema and the legality matrix before anything runs."""
    from sparsetron.configs.schema.validate import validate
    from sparsetron.train.cli import compose

    for lay in layouts:
        cfg = compose([*matrix.base, *lay.overrides(), f"train.max_steps={lay.steps or matrix.steps}"],
                      run_dir="/nonexistent")
        try:
            validate(cfg, lay.world)
        except ValueError as err:
            raise ValueError(f"matrix {matrix.name}, layout {lay.name}: {err}") from None


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launch and every process under it. torchrun starts its workers in sessions of their
    own, so killing its process group missed them: hung NCCL workers lived on, spinning on the GPUs
    and slowing the next layouts (seen on 4 H200s)."""
    try:
        import psutil

        victims = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the launcher already gone: the group kill below still runs
        victims = []
    # every worker writes its Python stacks to <run dir>/stacks/ first (train/resilience.enable_stack_dumps)
    for child in victims:
        try:
            child.send_signal(STACK_DUMP_SIGNAL)
        except Exception:
            pass
    if victims:
        time.sleep(3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in victims:
        try:
            child.kill()
        except Exception:
            pass
    proc.wait()


def run_layout(matrix, layout, run_dir: str, comm_timer: bool, timeout: int, peak_tflops: Optional[float] = None) -> dict:
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to: a stale one would mix runs
    os.makedirs(run_dir)
    cmd = launch_command(layout) + run_overrides(matrix, layout, run_dir, peak_tflops)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(os.path.join(run_dir, "launch.log"), "w") as log:
        # own process group: a timed-out run is killed with all its ranks, which would otherwise
        # live on holding GPU memory (the next layouts then ran out of memory)
        env = {k: v.replace("{run_dir}", run_dir) for k, v in run_env(matrix, comm_timer, layout).items()}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = "timeout"
    return {"command": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - start,
            "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0]}


def _log_tail(run_dir: str, n: int = 2000) -> str:
    path = os.path.join(run_dir, "launch.log")
    if not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()[-n:]


# ----------------------------------------------------------------------------------- measuring
def probe_machine(world: int, out_dir: str) -> dict:
    path = os.path.join(out_dir, "probe.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           os.path.join(HERE, "probe.py"), "--out", path]
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True,
                   timeout=300)
    with open(path) as f:
        return json.load(f)


def cpu_cluster(probe: dict):
    """The perf model's Cluster for this machine, from probe.py's numbers.

    One rank = one core ("GPU"); every rank is on one node. Link numbers are scaled for fp32:
    the model counts 2-byte elements, so the effective bandwidth is measured / 2; nvlink_gbps is
    the model's both-directions figure (it runs rings at half of it), hence 2 * measured / 2."""
    from sparsetron.parallel.perf_model import Cluster

    ar = probe.get("all_reduce") or {"bytes_per_s": 1e12, "latency_s": 0.0}
    link_gbps = ar["bytes_per_s"] * FP32_BYTES_SCALE / 1e9
    lat_us = max(ar["latency_s"] / 2 * 1e6, 1e-3)  # 2-rank ring: 2 (n - 1) = 2 latencies per all-reduce
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Cluster(name="cpu-gloo", peak_tflops=probe["matmul_flops"] / 1e12, hbm_gb=mem_gb,
                   hbm_gbps=probe["copy_bytes_per_s"] / 1e9, nvlink_gbps=2 * link_gbps, inter_node_gbps=link_gbps,
                   intra_latency_us=lat_us, inter_latency_us=lat_us, gpus_per_node=os.cpu_count() or 1,
                   pcie_gbps=probe["copy_bytes_per_s"] / 1e9, overhead_gb=0.0)


def flops_per_token(run_dir: str) -> float:
    """The trainer's MFU numerator (train/metrics.py: 6 N + 12 L d S) for the run's config."""
    from omegaconf import OmegaConf

    from sparsetron.train.metrics import flops_per_token as fpt
    from sparsetron.train.metrics import parameter_counts

    cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    counts = parameter_counts(cfg.model, cfg.attention, cfg.moe)
    return fpt(cfg.model, cfg.train.seq_len, counts["active"], counts["embedding"])


def perf_model_measurement(run_dir: str, world: int, step_time_s: float, label: str):
    """collect.py's calibration entry (layout incl. SP and virtual stages) as a perf-model Measurement."""
    from sparsetron.parallel.perf_model import Layout, Measurement, model_from_dict

    item = collect.measurement_from_run(run_dir, world_size=world, warmup=0)
    return Measurement(model_from_dict(item["model"]), Layout(**item["layout"]), step_time_s, label)


def calibrate_runs(runs: List[dict], cluster) -> Optional[dict]:
    """Fit compute / comm efficiency on the measured runs; predicted vs measured per run."""
    from sparsetron.parallel.perf_model import calibrate, predict

    ok = [r for r in runs if r.get("metrics")]
    if not ok:
        return None
    ms = [perf_model_measurement(os.path.join(REPO, r["run_dir"]), r["layout"]["world"], r["metrics"]["step_time_s"],
                                 r["name"]) for r in ok]
    result = calibrate(ms, cluster)
    rows = []
    for r, m, row in zip(ok, ms, result["rows"]):
        pred = predict(m.model, m.layout, result["cluster"])
        b = pred.breakdown
        # What the comm timer sees: every collective's time (DP before overlap) + PP waits (bubble).
        comm = b["tp_comm"] + b["ep_comm"] + b["cp_comm"] + b["pp_p2p"] + b["pp_bubble"] + pred.dp_comm_total_s
        rows.append({**row, "perf_model_layout": m.layout.short(), "predicted_comm_s": comm,
                     "measured_comm_s": r["metrics"].get("comm_s"),
                     "predicted_breakdown_s": b})
    return {"initial_cluster": dataclasses.asdict(cluster), "fitted": result["fitted"],
            "cluster": dataclasses.asdict(result["cluster"]), "rms_rel_error": result["rms_rel_error"], "rows": rows}


def recommendations(runs: List[dict], calibration: Optional[dict], top: int = 3) -> dict:
    """Per model and GPU count of the measured multi-GPU runs: the layouts the calibrated perf model
    ranks fastest (same global batch), next to the measured layouts and the model's prediction for
    each; a recommended layout nobody ran is named as such."""
    from sparsetron.parallel.perf_model import Cluster, predict, rank_layouts

    if not calibration:
        return {}
    cluster = Cluster(**calibration["cluster"])
    groups: dict = {}
    for r in runs:
        if r.get("metrics") and r["layout"]["world"] > 1:
            m = perf_model_measurement(os.path.join(REPO, r["run_dir"]), r["layout"]["world"],
                                       r["metrics"]["step_time_s"], r["name"])
            groups.setdefault((m.model.name, m.model, m.layout.n_gpus, m.layout.global_batch), []).append((r, m))
    out = {}
    for (name, model, n, gb), items in groups.items():
        ranked = rank_layouts(model, n, cluster, gb)
        key = f"{name} x{n} gb{gb}"
        measured = []
        for r, m in items:  # its rank: 1 + the searched layouts predicted faster (the search skips ZeRO-0)
            pred = predict(m.model, m.layout, cluster).step_time_s
            measured.append({"run": r["name"], "layout": m.layout.short(), "measured_s": m.step_time_s,
                             "predicted_s": pred, "rank": 1 + sum(p.step_time_s < pred for p in ranked)})
        out[key] = {"recommended": [{"layout": p.layout.short(), "predicted_s": p.step_time_s,
                                     "memory_gb": p.memory_gb} for p in ranked[:top]],
                    "measured": measured, "layouts_considered": len(ranked),
                    "best_measured": min(measured, key=lambda x: x["measured_s"])["layout"],
                    "recommended_was_measured": bool(ranked) and ranked[0].layout.short() in {x["layout"] for x in measured}}
    return out


# ----------------------------------------------------------------------------------- reporting
LOSS_STEPS = 5  # the issue's "first steps"


def loss_match(runs: List[dict], steps: int = LOSS_STEPS) -> dict:
    """Per run with a ``loss_ref``: max |loss - ref loss| over the first ``steps`` logged steps both have.
    bf16 runs of different layouts reduce in different orders, so expect ~1e-3..1e-2, not zero."""
    by_name = {r["name"]: r for r in runs}
    out = {}
    for r in runs:
        ref_name = r["layout"].get("loss_ref")
        if not ref_name:
            continue
        ref = by_name.get(ref_name)
        mine = dict(map(tuple, (r.get("metrics") or {}).get("losses", [])))
        theirs = dict(map(tuple, ((ref or {}).get("metrics") or {}).get("losses", [])))
        common = sorted(set(mine) & set(theirs))[:steps]
        if not common:
            out[r["name"]] = {"ref": ref_name, "status": "missing losses (run or reference failed)"}
            continue
        diffs = [abs(mine[k] - theirs[k]) for k in common]
        out[r["name"]] = {"ref": ref_name, "steps": common, "loss": [mine[k] for k in common],
                          "ref_loss": [theirs[k] for k in common], "max_abs_diff": max(diffs),
                          "max_rel_diff": max(d / abs(theirs[k]) for d, k in zip(diffs, common))}
    return out


def environment(matrix: matrices.Matrix) -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "megatron-core", "hydra-core", "triton"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
        versions["sparsetron_commit"] = commit + ("+dirty" if dirty else "")
    except OSError:
        pass
    device = {"kind": matrix.device, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            device["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if matrix.device == "cuda":
        import torch

        if torch.cuda.is_available():
            device["gpu"] = torch.cuda.get_device_name(0)
            device["gpu_count"] = torch.cuda.device_count()
    return {"device": device, "versions": versions}


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(report: dict) -> None:
    calib = {row["label"]: row for row in (report.get("calibration") or {}).get("rows", [])}
    print(f"\nscaling matrix {report['matrix']} on {report['environment']['device'].get('cpu_model') or ''} "
          f"{report['environment']['device'].get('gpu', '')} (MEASURED; 'pred' = calibrated perf model)")
    print(f"{'layout':<16} {'W':>2} {'tp':>2} {'pp':>2} {'dp':>2} {'z':>1} {'tok/s':>8} {'tok/s/w':>8} {'MFU%':>5} "
          f"{'spread':>6} {'memGiB':>6} {'comm_s':>7} {'comm%':>5} {'step_s':>7} {'pred_s':>7} {'err%':>6} "
          f"{'pred_comm':>9}")
    for r in report["runs"]:
        lay, m = r["layout"], r.get("metrics")
        head = f"{r['name']:<16} {lay['world']:>2} {lay['tp']:>2} {lay['pp']:>2} {lay['dp']:>2} {lay['zero_stage']:>1}"
        if not m:
            print(f"{head} FAILED ({r.get('status')})")
            continue
        c = calib.get(r["name"], {})
        mfu = m.get("mfu")
        print(f"{head} {m['tokens_per_s']:>8.0f} {m['tokens_per_s'] / lay['world']:>8.0f} "
              f"{_fmt(None if mfu is None else 100 * mfu, '5.1f'):>5} {100 * m.get('tokens_per_s_spread', 0.0):>5.0f}% "
              f"{_fmt(m['peak_mem_gib'], '6.2f'):>6} "
              f"{_fmt(m.get('comm_s'), '7.4f'):>7} "
              f"{_fmt(None if m.get('comm_fraction') is None else 100 * m['comm_fraction'], '5.1f'):>5} "
              f"{m['step_time_s']:>7.4f} {_fmt(c.get('predicted_s'), '7.4f'):>7} "
              f"{_fmt(None if 'rel_error' not in c else 100 * c['rel_error'], '+6.1f'):>6} "
              f"{_fmt(c.get('predicted_comm_s'), '9.4f'):>9}")
    for kind in ("strong", "weak"):
        for curve, rows in report["scaling"][kind].items():
            pts = ", ".join(f"{x['world']}w {100 * x['efficiency']:.0f}%" for x in rows)
            print(f"{kind} scaling efficiency [{curve}]: {pts}")
    for name, lm in (report.get("loss_match") or {}).items():
        if "max_abs_diff" in lm:
            print(f"loss match {name} vs {lm['ref']}: max |diff| {lm['max_abs_diff']:.2e} over steps {lm['steps']}")
        else:
            print(f"loss match {name} vs {lm['ref']}: {lm['status']}")
    for key, rec in (report.get("recommendations") or {}).items():
        best = rec["recommended"][0] if rec["recommended"] else None
        print(f"perf model for {key}: recommends {best and best['layout']} ({best and best['predicted_s']:.3f} s); "
              f"measured best {rec['best_measured']}" + ("" if rec["recommended_was_measured"] else
                                                         " (the recommended layout was not run)"))
    cal = report.get("calibration")
    if cal:
        fitted = ", ".join(f"{k}={v:.3f}" for k, v in cal["fitted"].items())
        print(f"perf model calibrated on {len(cal['rows'])} runs: {fitted}; rms relative error "
              f"{100 * cal['rms_rel_error']:.1f}%")


def _one_repeat(matrix, lay, run_dir: str, probe, args) -> dict:
    rep = {"run_dir": os.path.relpath(run_dir, REPO)}
    if not args.collect_only:
        rep["launch"] = run_layout(matrix, lay, run_dir, not args.no_comm_timer, args.timeout, args.peak_tflops)
        if rep["launch"]["rc"] != 0:
            return {**rep, "status": f"failed (rc {rep['launch']['rc']})", "log_tail": _log_tail(run_dir)}
    try:
        m = collect.run_metrics(run_dir, warmup=matrix.warmup)
    except (ValueError, OSError) as err:
        return {**rep, "status": "failed", "error": str(err), "log_tail": _log_tail(run_dir)}
    return {**rep, "status": "ok", "metrics": m}


def measure_layout(matrix, lay, runs_root: str, probe, args) -> dict:
    """Run (or re-read) one layout ``args.repeats`` times. Metrics: per field, the median over the
    repeats that succeeded; ``tokens_per_s_spread`` = (max - min) / median of their throughput."""
    base_dir = os.path.join(runs_root, lay.name)
    entry = {"name": lay.name, "layout": lay.describe(), "run_dir": os.path.relpath(base_dir, REPO)}
    if not args.collect_only:
        print(f"[{lay.name}] world {lay.world} ...", end=" ", flush=True)
    reps = [_one_repeat(matrix, lay, base_dir if k == 0 else f"{base_dir}.rep{k + 1}", probe, args)
            for k in range(args.repeats)]
    entry["repeats"] = reps
    good = [r["metrics"] for r in reps if r["status"] == "ok"]
    if not good:
        entry["status"] = reps[0]["status"]
    else:
        keys = [k for k, v in good[0].items() if isinstance(v, (int, float)) and v is not None]
        m = {k: statistics.median(g[k] for g in good if g.get(k) is not None) for k in keys}
        m.update({k: None for k, v in good[0].items() if v is None})
        m["losses"], m["comm_s_by_op"] = good[0].get("losses", []), good[0].get("comm_s_by_op", {})
        tps = [g["tokens_per_s"] for g in good]
        m["repeats_ok"] = len(good)
        m["tokens_per_s_spread"] = (max(tps) - min(tps)) / m["tokens_per_s"]
        if m.get("mfu") is not None:  # the trainer's MFU: only where a peak is known or given
            m["mfu_peak"] = (f"logging.peak_tflops={args.peak_tflops} (given)" if args.peak_tflops
                             else "datasheet dense bf16 (train/metrics.py PEAK_BF16)")
        entry["metrics"], entry["status"] = m, "ok" if len(good) == len(reps) else f"ok ({len(good)}/{len(reps)})"
        entry["run_dir"] = next(r["run_dir"] for r in reps if r["status"] == "ok")  # config for calibration
    if not args.collect_only:
        wall = sum(r["launch"]["wall_s"] for r in reps if "launch" in r)
        print(entry["status"] + (f", {entry['metrics']['tokens_per_s']:.0f} tok/s" if "metrics" in entry else "")
              + f" ({wall:.0f} s)", flush=True)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", required=True, help=f"one of {sorted(matrices.MATRICES)}")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scaling_<matrix>.json); "
                                                "PNGs go next to it as <stem>_strong.png / <stem>_weak.png")
    ap.add_argument("--runs-root", default=None, help="run directories (default runs/scaling/<matrix>)")
    ap.add_argument("--only", default=None, help="comma list of layout names (default: all)")
    ap.add_argument("--collect-only", action="store_true", help="do not train; re-read the existing run dirs")
    ap.add_argument("--no-comm-timer", action="store_true",
                    help="do not set SPARSETRON_COMM_TIMER=1 (no comm_s; on GPU the timer's syncs cost time)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run before it is killed")
    ap.add_argument("--repeats", type=int, default=1, help="runs per layout (medians over them; shows the noise)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="MFU denominator per GPU/rank (logging.peak_tflops); default: the GPU's datasheet peak, "
                         "no MFU on CPU")
    args = ap.parse_args(argv)
    try:
        matrix = matrices.get(args.matrix)
        layouts = [matrix.layout(n.strip()) for n in args.only.split(",")] if args.only else list(matrix.layouts)
        if args.timeout < 1:
            raise ValueError(f"--timeout must be >= 1, got {args.timeout}")
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        if args.peak_tflops is not None and args.peak_tflops <= 0:
            raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    except ValueError as err:
        ap.error(str(err))
    out = os.path.abspath(args.out or os.path.join(REPO, "benchmarks", "results", f"scaling_{matrix.name}.json"))
    runs_root = os.path.abspath(args.runs_root or os.path.join(REPO, "runs", "scaling", matrix.name))
    os.makedirs(runs_root, exist_ok=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    validate_matrix(matrix, layouts)
    env_path = os.path.join(runs_root, "environment.json")  # the training machine's, for --collect-only
    if not args.collect_only:
        with open(env_path, "w") as f:
            json.dump(environment(matrix), f, indent=1)
    with open(env_path) as f:
        trained_on = json.load(f)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    probe = None
    if matrix.device == "cpu":
        probe = probe_machine(max(lay.world for lay in layouts), runs_root)
        print(f"probe: {probe['matmul_flops'] / 1e9:.1f} GFLOP/s fp32 matmul per rank, "
              f"{probe['copy_bytes_per_s'] / 1e9:.1f} GB/s copy"
              + (f", gloo all-reduce {probe['all_reduce']['latency_s'] * 1e6:.0f} us + bytes / "
                 f"{probe['all_reduce']['bytes_per_s'] / 1e9:.2f} GB/s" if "all_reduce" in probe else ""), flush=True)

    runs = [measure_layout(matrix, lay, runs_root, probe, args) for lay in layouts]

    points = [{"name": r["name"], "world": r["layout"]["world"], "strong": r["layout"]["strong"],
               "weak": r["layout"]["weak"], "tokens_per_s": (r.get("metrics") or {}).get("tokens_per_s")}
              for r in runs]
    scaling = {"strong": scaling_math.strong_scaling(points), "weak": scaling_math.weak_scaling(points)}

    if matrix.device == "cpu":
        cluster = cpu_cluster(probe) if probe else None
    else:
        from sparsetron.parallel.perf_model import CLUSTER_PRESETS

        cluster = CLUSTER_PRESETS["h100"]
        if "H200" in str(trained_on["device"].get("gpu", "")):  # same dense peak, more and faster memory
            cluster = dataclasses.replace(cluster, name="h200", hbm_gb=141.0, hbm_gbps=4800.0)
    calibration = calibrate_runs(runs, cluster) if cluster is not None else None

    loads = [rep["launch"]["load_avg_1min_before"] for r in runs for rep in r["repeats"] if "launch" in rep]
    noise = None
    if matrix.device == "cpu" and loads:
        busiest = max(loads)
        noise = (f"1-min load average before the runs: max {busiest:.2f} on {os.cpu_count()} cores; values near or "
                 f"above the core count mean other processes shared the cores (timings noisy)")
    stem = os.path.splitext(out)[0]
    report = {
        "kind": "measured",
        "matrix": matrix.name,
        "description": matrix.description,
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "run.py", *(argv or sys.argv[1:])]),
        "environment": {**trained_on, "load_avg_at_start": list(load_start), "timing_noise": noise},
        "settings": {"steps": matrix.steps, "warmup_steps_skipped": matrix.warmup, "base_overrides": list(matrix.base),
                     "comm_timer": not args.no_comm_timer, "repeats": args.repeats,
                     "omp_num_threads_per_rank": 1 if matrix.device == "cpu" else None,
                     "launch": "one torchrun (python -m torch.distributed.run --standalone) per layout"},
        "probe": probe,
        "runs": runs,
        "scaling": scaling,
        "calibration": calibration,
        "loss_match": loss_match(runs),
        "recommendations": recommendations(runs, calibration),
        "plots": {kind: os.path.relpath(f"{stem}_{kind}.png", REPO) for kind in ("strong", "weak")},
        "harness_wall_s": time.perf_counter() - t_start,
    }
    title = f"{matrix.name} ({matrix.device})"
    if scaling["strong"]:
        plots.plot_strong(scaling["strong"], stem + "_strong.png", title)
    if scaling["weak"]:
        plots.plot_weak(scaling["weak"], stem + "_weak.png", title)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {os.path.relpath(out, REPO)} and {report['plots']['strong']}, {report['plots']['weak']}")
    print_table(report)
    return 0 if all(r["status"].startswith("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
