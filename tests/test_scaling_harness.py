"""Scaling harness (benchmarks/scaling/) and the communication timer (parallel/comm_timer.py).

Run as a script under torchrun, this file is also the 2-rank gloo worker of the comm-timer test."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALING = ROOT / "benchmarks" / "scaling"
DELAY = 0.5  # seconds the late rank sleeps before a collective


def _load(name):
    """benchmarks/ is not a package: import the harness modules by name from their folder, as run.py
    imports its siblings (one module object per file, shared with run.py)."""
    if str(SCALING) not in sys.path:
        sys.path.insert(0, str(SCALING))
    return importlib.import_module(name)


# ------------------------------------------------------------------------------- comm timer
def _comm_timer_worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from sparsetron.parallel import comm_timer as ct

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    original, original_isend = dist.all_reduce, dist.isend
    ct.install()
    res = {"patched": dist.all_reduce is not original}

    def late(fn):
        """Both ranks call fn; rank 1 arrives DELAY late. Returns this rank's comm seconds."""
        dist.barrier()
        ct.comm_seconds_and_reset()
        if rank == 1:
            time.sleep(DELAY)
        fn()
        return ct.comm_seconds_and_reset()

    x = torch.full((4096,), float(rank + 1))
    res["sync_s"] = late(lambda: dist.all_reduce(x))
    res["sync_ok"] = bool(torch.all(x == 3.0))

    y = torch.full((4096,), float(rank + 1))
    res["async_s"] = late(lambda: dist.all_reduce(y, async_op=True).wait())
    res["async_ok"] = bool(torch.all(y == 3.0))

    # Point-to-point as torch.distributed.pipelining issues it: P2POp(isend/irecv) + batch_isend_irecv.
    buf = torch.full((256,), float(rank))

    def p2p():
        op = dist.P2POp(dist.isend if rank == 1 else dist.irecv, buf, 1 - rank)
        for work in dist.batch_isend_irecv([op]):
            work.wait()

    res["p2p_s"] = late(p2p)
    res["p2p_ok"] = bool(torch.all(buf == 1.0))

    # Time outside collectives is not communication.
    dist.barrier()
    ct.comm_seconds_and_reset()
    time.sleep(0.3)
    dist.all_reduce(torch.ones(16))
    res["idle_s"] = ct.comm_seconds_and_reset()

    # DDP: bucket all-reduces run from C++; the comm hook must time them and still average.
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8)
    ref = [p.detach().clone() for p in model.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    res["ddp_attached"] = ct.attach_ddp(ddp)
    inputs = [torch.full((4, 32), float(r + 1)) for r in range(2)]
    dist.barrier()
    ct.comm_seconds_and_reset()
    if rank == 1:
        time.sleep(DELAY)
    ddp(inputs[rank]).square().sum().backward()
    res["ddp_s"] = ct.comm_seconds_and_reset()
    expected = []
    for r in range(2):  # each rank's gradient from the same initial weights, averaged
        lin = torch.nn.Linear(32, 8)
        with torch.no_grad():
            for p, w in zip(lin.parameters(), ref):
                p.copy_(w)
        lin(inputs[r]).square().sum().backward()
        expected.append([p.grad for p in lin.parameters()])
    res["ddp_grad_ok"] = all(torch.allclose(p.grad, (a + b) / 2, rtol=1e-5, atol=1e-5)
                             for p, a, b in zip(model.parameters(), *expected))
    ct.uninstall()
    import torch.distributed.distributed_c10d as c10d

    res["restored"] = (dist.all_reduce is original and c10d.all_reduce is original
                       and dist.isend is original_isend and c10d.isend is original_isend)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    del ddp  # the reducer holds the process group: release it before destroying the group
    dist.barrier()
    dist.destroy_process_group()


def test_comm_timer_counts_time_blocked_in_collectives_on_two_gloo_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, str(tmp_path)], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["patched"] and r["restored"] and r["ddp_attached"]
        assert r["sync_ok"] and r["async_ok"] and r["p2p_ok"] and r["ddp_grad_ok"]
        assert r["idle_s"] < 0.15  # the 0.3 s sleep before the all-reduce is not counted
    # Rank 0 waits for the late rank inside each collective; the late rank hardly waits at all.
    for key in ("sync_s", "async_s", "p2p_s", "ddp_s"):
        assert DELAY * 0.9 <= r0[key] < DELAY + 1.5, (key, r0[key])
        assert r1[key] < DELAY * 0.5, (key, r1[key])


def test_comm_timer_is_off_without_the_env_var_and_rejects_bad_values(monkeypatch):
    import torch.distributed as dist

    from sparsetron.parallel import comm_timer as ct

    monkeypatch.delenv(ct.ENV, raising=False)
    before = dist.all_reduce
    timer = ct.StepCommTimer.from_env(engine=None)
    timer.reset()
    assert timer.record() == {} and dist.all_reduce is before
    monkeypatch.setenv(ct.ENV, "maybe")
    with pytest.raises(ValueError, match=ct.ENV):
        ct.StepCommTimer.from_env(engine=None)


def test_union_of_intervals_counts_overlaps_once():
    from sparsetron.parallel.comm_timer import union_seconds

    assert union_seconds([]) == 0.0
    assert union_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 3.5)]) == pytest.approx(2.5)
    assert union_seconds([(5.0, 6.0), (0.0, 10.0)]) == pytest.approx(10.0)


# ------------------------------------------------------------------------------- collector
def _write_run(run_dir: Path, records, cfg: dict = None):
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if cfg is not None:
        OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")


def test_collector_takes_medians_over_steady_steps_and_the_peak_memory(tmp_path):
    collect = _load("collect")
    recs = []
    steps = [(9.0, 100.0, 0.0, 2.5), (8.0, 110.0, 0.0, 1.0),  # warm-up (2 steps): slow, and the memory peak
             (0.50, 2000.0, 0.10, 1.1), (0.40, 2500.0, 0.05, 1.2), (0.60, 1700.0, 0.30, 1.3)]
    for i, (dt, tps, comm, mem) in enumerate(steps):
        recs.append({"kind": "train", "step": i + 1, "loss": 5.0 - i, "step_time_s": dt, "tokens_per_s": tps,
                     "mem_gib": mem, "comm_s": comm, "mfu": tps / 1e4})
    recs.insert(3, {"kind": "val", "step": 2, "loss": 1.0, "step_time_s": 123.0})
    _write_run(tmp_path / "r", recs)
    m = collect.run_metrics(str(tmp_path / "r"), warmup=2)
    assert m["steps_used"] == 3
    assert m["step_time_s"] == pytest.approx(0.50)
    assert m["tokens_per_s"] == pytest.approx(2000.0)
    assert m["mfu"] == pytest.approx(0.2)
    assert m["comm_s"] == pytest.approx(0.10)
    assert m["comm_fraction"] == pytest.approx(0.2)  # median of 0.2, 0.125, 0.5
    assert m["peak_mem_gib"] == pytest.approx(2.5)  # a high-water mark: warm-up steps count
    assert m["final_loss"] == pytest.approx(1.0)  # the last steady step's

    _write_run(tmp_path / "nocomm", [{k: v for k, v in r.items() if k not in ("comm_s", "mfu")} for r in recs])
    m = collect.run_metrics(str(tmp_path / "nocomm"), warmup=2)
    assert m["comm_s"] is None and m["comm_fraction"] is None and m["mfu"] is None
    with pytest.raises(ValueError, match="warmup=5"):
        collect.run_metrics(str(tmp_path / "r"), warmup=5)
    with pytest.raises(ValueError, match="metrics.jsonl"):
        collect.run_metrics(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- scaling math
def test_strong_and_weak_scaling_efficiency_on_hand_numbers():
    sm = _load("scaling_math")
    runs = [{"name": "w1", "world": 1, "tokens_per_s": 1000.0, "strong": ("ddp", "tp"), "weak": ("ddp",)},
            {"name": "w2", "world": 2, "tokens_per_s": 1800.0, "strong": ("ddp",)},
            {"name": "w4", "world": 4, "tokens_per_s": 3000.0, "strong": ("ddp",)},
            {"name": "w2tp", "world": 2, "tokens_per_s": 1200.0, "strong": ("tp",)},
            {"name": "w4tp_failed", "world": 4, "tokens_per_s": None, "strong": ("tp",)},
            {"name": "w2weak", "world": 2, "tokens_per_s": 1900.0, "weak": ("ddp",)},
            {"name": "w8weak", "world": 8, "tokens_per_s": 6400.0, "weak": ("ddp",)}]
    strong = sm.strong_scaling(runs)
    assert [r["name"] for r in strong["ddp"]] == ["w1", "w2", "w4"]
    assert [r["speedup"] for r in strong["ddp"]] == pytest.approx([1.0, 1.8, 3.0])
    assert [r["efficiency"] for r in strong["ddp"]] == pytest.approx([1.0, 0.9, 0.75])
    assert [r["efficiency"] for r in strong["tp"]] == pytest.approx([1.0, 0.6])  # the failed run is no point
    weak = sm.weak_scaling(runs)
    assert [r["tokens_per_s_per_worker"] for r in weak["ddp"]] == pytest.approx([1000.0, 950.0, 800.0])
    assert [r["efficiency"] for r in weak["ddp"]] == pytest.approx([1.0, 0.95, 0.8])
    # A base that is not one worker: efficiency is relative to the smallest run of the curve.
    two_base = sm.strong_scaling([{"name": "a", "world": 2, "tokens_per_s": 100.0, "strong": ("x",)},
                                  {"name": "b", "world": 8, "tokens_per_s": 300.0, "strong": ("x",)}])
    assert two_base["x"][1]["efficiency"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same world size"):
        sm.strong_scaling(runs + [{"name": "dup", "world": 2, "tokens_per_s": 1.0, "strong": ("ddp",)}])


# ------------------------------------------------------------------------------ legality
def test_every_layout_of_every_matrix_is_legal_and_an_illegal_one_is_refused():
    matrices, run = _load("matrices"), _load("run")
    assert {"cpu_smoke", "gpu8", "gpu_weak"} <= set(matrices.MATRICES)
    for matrix in matrices.MATRICES.values():
        names = [lay.name for lay in matrix.layouts]
        assert len(set(names)) == len(names), matrix.name
        run.validate_matrix(matrix, matrix.layouts)  # config schema + legality at each world size
    gpu8 = matrices.get("gpu8")
    assert {lay.world for lay in gpu8.layouts} == {1, 2, 4, 8}
    assert {lay.tp for lay in gpu8.layouts} >= {2, 4, 8} and {lay.pp for lay in gpu8.layouts} >= {2, 4}
    assert {lay.zero_stage for lay in gpu8.layouts} >= {1, 3} and max(lay.ep for lay in gpu8.layouts) == 8
    gpu4 = matrices.get("gpu4")
    names = {lay.name for lay in gpu4.layouts}
    assert all(lay.world <= 4 for lay in gpu4.layouts) and all(lay.loss_ref in names | {""} for lay in gpu4.layouts)
    bad = matrices.Layout("tp3", 3, 4, 12, tp=3)
    with pytest.raises(ValueError, match="tp3.*parallel.tp"):
        run.validate_matrix(matrices.get("cpu_smoke"), [bad])
    with pytest.raises(ValueError, match="cpu_smoke"):
        matrices.get("nope")


# ---------------------------------------------------------------------------- calibration
def test_calibration_from_run_dirs_recovers_known_efficiencies(tmp_path):
    import dataclasses

    from omegaconf import OmegaConf

    from sparsetron.parallel.perf_model import predict
    from sparsetron.train.cli import compose

    matrices, run = _load("matrices"), _load("run")
    probe = {"matmul_flops": 50e9, "copy_bytes_per_s": 10e9, "all_reduce": {"latency_s": 200e-6, "bytes_per_s": 1e9}}
    cluster = run.cpu_cluster(probe)
    assert cluster.peak_tflops == pytest.approx(0.05) and cluster.intra_latency_us == pytest.approx(100.0)
    assert cluster.nvlink_gbps == pytest.approx(1.0)  # fp32 on the wire, bf16 in the model: 2 * 1 GB/s / 2
    truth = dataclasses.replace(cluster, compute_efficiency=0.37, comm_efficiency=0.21)
    matrix = matrices.get("cpu_smoke")
    runs = []
    for lay in matrix.layouts:
        run_dir = tmp_path / lay.name
        cfg = compose([*matrix.base, *lay.overrides()], run_dir=str(run_dir))
        placeholder = [{"kind": "train", "step": 1, "step_time_s": 1.0}]
        _write_run(run_dir, placeholder, OmegaConf.to_container(cfg, resolve=False))
        meas = run.perf_model_measurement(str(run_dir), lay.world, 1.0, lay.name)  # model + layout of the config
        t = predict(meas.model, meas.layout, truth).step_time_s
        (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "step_time_s": t}) + "\n")
        runs.append({"name": lay.name, "layout": lay.describe(), "run_dir": str(run_dir),
                     "metrics": {"step_time_s": t, "comm_s": None}})
    result = run.calibrate_runs(runs, cluster)  # starts from the default efficiencies 0.6 / 0.8
    assert result["fitted"]["compute_efficiency"] == pytest.approx(0.37, rel=1e-3)
    assert result["fitted"]["comm_efficiency"] == pytest.approx(0.21, rel=1e-3)
    assert result["rms_rel_error"] < 1e-4
    tp_row = next(r for r in result["rows"] if r["label"] == "w2_tp2")
    assert tp_row["predicted_comm_s"] > 0 and tp_row["perf_model_layout"].startswith("tp2 pp1 dp1")

    # recommended vs measured: per (model, GPUs, global batch) of the multi-rank runs, the fitted model's
    # fastest layouts; every measured layout is among those it considered, ranked by its prediction
    recs = run.recommendations(runs, result, top=2)
    assert recs and all(key.endswith(" x2 gb8") or key.endswith(" x2 gb16") for key in recs)
    strong = next(v for k, v in recs.items() if k.endswith("gb8"))
    assert {m["run"] for m in strong["measured"]} >= {"w2_ddp", "w2_tp2", "w2_pp2"}
    assert all(1 <= m["rank"] <= strong["layouts_considered"] + 1 and m["predicted_s"] > 0 for m in strong["measured"])
    zero1 = next(m for m in strong["measured"] if m["run"] == "w2_zero1_ds")
    assert zero1["predicted_s"] == pytest.approx(zero1["measured_s"], rel=1e-3)  # calibrated to fit exactly
    preds = [r["predicted_s"] for r in strong["recommended"]]
    assert len(preds) == 2 and preds == sorted(preds)
    assert strong["best_measured"] == min(strong["measured"], key=lambda m: m["measured_s"])["layout"]


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_harness_runs_cpu_layouts_and_writes_json_and_pngs(tmp_path):
    """Three of cpu_smoke's layouts (~30 s); the full matrix is the command in benchmarks/scaling/README.md."""
    out = tmp_path / "scaling_test.json"
    peak_tflops = 0.05  # a given peak (a CPU has no datasheet one): the trainer then logs MFU against it
    proc = subprocess.run([sys.executable, str(SCALING / "run.py"), "--matrix", "cpu_smoke", "--out", str(out),
                           "--runs-root", str(tmp_path / "runs"), "--only", "w1_single,w2_ddp,w2_ddp_weak",
                           "--peak-tflops", str(peak_tflops)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "measured" and [r["status"] for r in report["runs"]] == ["ok"] * 3
    by_name = {r["name"]: r["metrics"] for r in report["runs"]}
    assert by_name["w1_single"]["comm_s"] == 0.0  # one process: no collectives
    assert by_name["w2_ddp"]["comm_s"] > 0.0  # DDP gradient all-reduce through the comm hook
    run = _load("run")
    for r in report["runs"]:
        m = r["metrics"]
        assert m["tokens_per_s"] > 0 and m["peak_mem_gib"] > 0 and m["steps_used"] == 10
        # the trainer's MFU (logging.peak_tflops passed through) is the harness's flops accounting of the
        # run's own config over the given peak of all its ranks: no MFU bound is asserted on a CPU
        fpt = run.flops_per_token(str(ROOT / r["run_dir"]))
        expected = fpt * m["tokens_per_s"] / (r["layout"]["world"] * peak_tflops * 1e12)
        assert m["mfu"] == pytest.approx(expected, rel=1e-6), r["name"]
        assert m["mfu_peak"] == f"logging.peak_tflops={peak_tflops} (given)"
    assert [r["world"] for r in report["scaling"]["strong"]["ddp"]] == [1, 2]
    assert [r["world"] for r in report["scaling"]["weak"]["ddp"]] == [1, 2]
    assert len(report["calibration"]["rows"]) == 3 and report["probe"]["matmul_flops"] > 0
    for png in (tmp_path / "scaling_test_strong.png", tmp_path / "scaling_test_weak.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "perf model calibrated on 3 runs" in proc.stdout


if __name__ == "__main__":
    _comm_timer_worker(sys.argv[1])
    # The results are written and the group destroyed. Skip interpreter finalisation: gloo worker threads
    # can still hold Work objects with Python references, and tearing those down during finalisation
    # aborted a CI run once ("terminate called without an active exception", SIGABRT) after every check
    # had passed - a torch teardown race, not the comm timer (pytorch/pytorch#179291 describes it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_single_gpu_calibration_on_the_recorded_runs(tmp_path):
    """The perf model calibrated on the recorded H200 runs predicts the compiled variants within 5 %."""
    out = tmp_path / "cal.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "scaling", "calibrate_single_gpu.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert 0.3 < report["fitted_compute_efficiency"] < 0.9
    compiled = [r for r in report["rows"] if r["label"].startswith("compile")]
    assert compiled and all(abs(r["rel_error"]) < 0.05 for r in compiled), compiled


def test_loss_match_compares_the_first_common_steps_and_flags_missing_references():
    run = _load("run")

    def entry(name, losses, ref=""):
        return {"name": name, "layout": {"loss_ref": ref}, "metrics": {"losses": losses} if losses else None}

    runs = [entry("ref", [[1, 10.0], [2, 9.0], [3, 8.0]]),
            entry("a", [[1, 10.0], [2, 9.01], [3, 8.5], [4, 7.0]], ref="ref"),
            entry("b", None, ref="ref"), entry("c", [[1, 5.0]], ref="nope")]
    out = run.loss_match(runs, steps=2)
    assert out["a"]["steps"] == [1, 2] and out["a"]["max_abs_diff"] == pytest.approx(0.01)
    assert out["a"]["max_rel_diff"] == pytest.approx(0.01 / 9.0)
    assert "missing" in out["b"]["status"] and "missing" in out["c"]["status"] and "ref" not in out


def test_mfu_is_asked_of_the_trainer_only_with_a_given_peak():
    """No CPU MFU from a made-up peak: the runs get logging.peak_tflops only when --peak-tflops is given
    (on GPUs the trainer uses its datasheet table), and the harness computes no MFU of its own."""
    matrices, run = _load("matrices"), _load("run")
    m = matrices.get("cpu_smoke")
    lay = m.layouts[0]
    assert not any(o.startswith("logging.peak_tflops") for o in run.run_overrides(m, lay, "/x"))
    assert run.run_overrides(m, lay, "/x", peak_tflops=312.0)[-1] == "logging.peak_tflops=312.0"
    with pytest.raises(SystemExit):
        run.main(["--matrix", "cpu_smoke", "--peak-tflops", "0"])


def test_layout_comm_timer_overrides_the_harness_flag():
    matrices, run = _load("matrices"), _load("run")
    m = matrices.get("gpu4")
    assert run.run_env(m, True, m.layout("w4_zero1"))["SPARSETRON_COMM_TIMER"] == "0"
    assert run.run_env(m, True, m.layout("m4_ep4_fused"))["SPARSETRON_COMM_TIMER"] == "1"
    assert run.run_overrides(m, m.layout("g1_gb32"), "/x").count("train.max_steps=6") == 1
    pp_env = run.run_env(m, True, m.layout("p1_pp4"))  # PP layouts: a hang fails fast, NCCL's ops dumped
    assert pp_env["SPARSETRON_DIST_TIMEOUT_S"] == "60" and "{run_dir}" in pp_env["TORCH_FR_DUMP_TEMP_FILE"]
    assert "SPARSETRON_DIST_TIMEOUT_S" not in run.run_env(m, True, m.layout("b_tp4"))


def test_kill_tree_reaches_workers_in_their_own_session():
    """torchrun puts its workers in new sessions: a timed-out launch must not leave them running."""
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    run = _load("run")
    code = "import subprocess, time; subprocess.Popen(['sleep', '120'], start_new_session=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 20
    while not psutil.Process(proc.pid).children(recursive=True) and time.time() < deadline:
        time.sleep(0.1)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    run.kill_tree(proc)
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_comm_timer_splits_seconds_per_collective():
    from sparsetron.parallel.comm_timer import CommTimer

    timer = CommTimer(sync_cuda=False)
    timer.add(0.0, 1.0, "all_reduce")
    timer.add(0.5, 2.0, "all_to_all_single")  # overlaps the first: counted once in the total
    timer.add(3.0, 4.0, "all_reduce")
    total, by_op = timer.breakdown_and_reset()
    assert total == pytest.approx(3.0)
    assert by_op == pytest.approx({"all_reduce": 2.0, "all_to_all_single": 1.5})
    assert timer.breakdown_and_reset() == (0.0, {})
