"""Fault injection: what a user (or a disk, or the numerics) can do to a run, and what it must not cost.

Each test shows no silent corruption, no lost verified checkpoint, a clear one-line message, the
right exit code and, where a resume follows, losses identical to the run that was not disturbed.
CPU, gloo, the tiny model. Run alone with: pytest -m faults tests/test_faults.py"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsetron.tests.helpers import TINY, run_cli
from sparsetron.train import checkpoint as ckpt
from sparsetron.train import run_dir as rd
from sparsetron.train.metrics import read_metrics
from sparsetron.train.resilience import DIVERGED_EXIT_CODE, NonFiniteError, REQUEUE_EXIT_CODE, nan_fault_steps

pytestmark = pytest.mark.faults

BASE = [*TINY, "train.eval_every=0"]


def _losses(run, steps):
    train = read_metrics(str(run))["train"]
    return [train[s]["loss"] for s in steps]


def _scribble(path, offset, data):
    """Overwrite bytes in place: the size stays the same, as with a bad disk block."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _popen(args, env=None):
    cmd = [sys.executable, "-m", "sparsetron.train", *args]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)


def _wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---------------------------------------------------------------------- manifest (in process)
def _files(value: float):
    return {"model.safetensors": {"w": torch.full((64, 64), value)},
            "optimizer.pt": {"state": {"m": torch.full((64,), value)}},
            "layout.json": {"tp": 1}, "trainer_state.json": {"step": int(value)}}


@pytest.mark.parametrize("damage", ["random", "zeros", "truncate", "delete", "garbage_layout", "marker"])
def test_manifest_finds_every_kind_of_damage_and_auto_walks_back(tmp_path, damage):
    root = str(tmp_path)
    for s in (1, 2):
        ckpt.save(root, s, _files(float(s)), keep_last=3, run_id="r1")
    newest = tmp_path / "step_00000002"
    target = newest / ("layout.json" if damage == "garbage_layout" else "model.safetensors")
    size = target.stat().st_size
    if damage == "random":
        _scribble(target, size // 2, os.urandom(512))
    elif damage == "zeros":
        _scribble(target, size // 2, bytes(512))
    elif damage == "truncate":
        os.truncate(target, size - 100)
    elif damage == "delete":
        target.unlink()
    elif damage == "garbage_layout":
        target.write_bytes(b"\xff\xfe\x00garbage")
    else:
        (newest / ckpt.COMPLETE).write_bytes(b"{not json")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.verify(str(newest))
    assert str(newest) in str(err.value) and "\n" not in str(err.value)
    lines = []
    assert ckpt.newest_verified(root, say=lines.append).endswith("step_00000001")
    assert len(lines) == 1 and lines[0].startswith("sparsetron: skipping checkpoint step_00000002: ")
    assert ckpt.verify(str(tmp_path / "step_00000001"))


def test_pruning_keeps_the_verified_past_when_a_run_walked_back(tmp_path):
    root = str(tmp_path)
    for s in (10, 20, 30):
        ckpt.save(root, s, _files(float(s)), keep_last=2, run_id="r1")
    _scribble(tmp_path / "step_00000030" / "optimizer.pt", 10, os.urandom(64))
    assert ckpt.newest_verified(root, say=lambda _: None).endswith("step_00000020")
    ckpt.save(root, 25, _files(25.0), keep_last=2, run_id="r1")  # the resumed run's next save
    names = sorted(os.listdir(root))
    assert names == ["step_00000020", "step_00000025", "step_00000030"]  # 20 kept: 30 never re-verified
    ckpt.save(root, 30, _files(30.0), keep_last=2, run_id="r1")  # reaching 30 again replaces the damaged one
    assert sorted(os.listdir(root)) == ["step_00000025", "step_00000030"]
    assert ckpt.verify(os.path.join(root, "step_00000030"))


def test_other_runs_temp_dirs_survive_pruning_and_legacy_markers_load(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / ".tmp-step_00000009-otherrun-1234abcd")  # another run writing here now
    os.makedirs(tmp_path / ".tmp-step_00000003-r1-deadbeef")  # this run's, left by a kill -9
    ckpt.save(root, 4, _files(4.0), keep_last=2, run_id="r1")
    assert sorted(os.listdir(root)) == [".tmp-step_00000009-otherrun-1234abcd", "step_00000004"]
    (tmp_path / "step_00000004" / ckpt.COMPLETE).write_text("step 4\n")  # as written before manifests
    assert ckpt.verify(str(tmp_path / "step_00000004")) is False  # loads, unverified
    with pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints verifies"):
        _scribble(tmp_path / "step_00000004" / ckpt.COMPLETE, 0, b"\x00\x01")
        ckpt.newest_verified(root, say=lambda _: None)


def test_garbage_json_is_one_checkpoint_error(tmp_path):
    (tmp_path / "layout.json").write_bytes(os.urandom(64) + b"\xff")
    with pytest.raises(ckpt.CheckpointError, match="layout.json: cannot read"):
        ckpt.read_json(str(tmp_path), "layout.json")
    (tmp_path / "trainer_state.json").write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match="expected a JSON object"):
        ckpt.read_json(str(tmp_path), "trainer_state.json")


def test_io_causes_are_named():
    assert ckpt.io_cause("/tmp", OSError(errno.ENOSPC, "No space left on device")) == "no space left on device (ENOSPC)"
    assert "EROFS" in ckpt.io_cause("/tmp", OSError(errno.EROFS, "Read-only file system"))
    # torch.save on a full disk (no errno), and safetensors' Rust error text
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert "ENOSPC" in ckpt.io_cause("/tmp", torch_full)
    assert "EACCES" in ckpt.io_cause("/tmp", RuntimeError("Os { code: 13, kind: PermissionDenied }"))
    assert ckpt.io_cause("/tmp", RuntimeError("shape mismatch")) is None


def test_preflight_refuses_unwritable_and_full_and_warns_when_tight(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(rd.RunDirSpaceError, match="checkpoint dir .*a_file/ckpt is not writable"):
        rd.preflight(str(tmp_path), str(blocker / "ckpt"), 1)
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    with pytest.raises(rd.RunDirSpaceError, match="one checkpoint needs about"):
        rd.preflight(str(tmp_path), str(tmp_path / "ckpt"), free * 2)
    lines = []
    rd.preflight(str(tmp_path), str(tmp_path / "ckpt"), int(free * 0.7), say=lines.append)
    assert len(lines) == 1 and "but not two" in lines[0]
    assert rd.RunDirSpaceError.exit_code == ckpt.IO_EXIT_CODE


def test_a_new_run_never_inherits_an_earlier_starts_tokenizer_or_wandb_id(tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run.mkdir()
    (run / "tokenizer.json").write_text("old tokenizer")  # a start that died before its first step
    (run / "wandb_id.txt").write_text("oldid")
    lines = []
    first = rd.prepare(str(run), str(root), "none", False, "n", say=lines.append)
    assert not (run / "tokenizer.json").exists() and not (run / "wandb_id.txt").exists()
    aside = next(tmp_path.glob("run.replaced-*"))
    assert (aside / "tokenizer.json").read_text() == "old tokenizer" and "moved leftovers" in lines[0]
    assert rd.prepare(str(run), str(root), "auto", False, "n") == first  # a resume keeps the run's identity
    with pytest.raises(rd.RunDirError, match="cannot be combined with resume=auto"):
        rd.prepare(str(run), str(root), "auto", True, "n")


def test_nan_fault_steps_parse():
    assert nan_fault_steps("3,7-9") == {3, 7, 8, 9} and nan_fault_steps("") == frozenset()
    with pytest.raises(ValueError, match="SPARSETRON_FAULT_NAN_STEPS"):
        nan_fault_steps("soon")


# -------------------------------------------------------------- training runs (in process)
def _train_in_process(run, overrides, monkeypatch):
    from sparsetron.train.cli import compose
    from sparsetron.train.trainer import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = compose([*BASE, *overrides], run_dir=str(run))
    return train(cfg)


def test_disk_full_during_a_save_stops_with_io_exit_and_keeps_the_previous(tmp_path, monkeypatch):
    real = ckpt._write_one

    def full_disk(path, name, payload):
        if name == "optimizer.pt" and ".tmp-step_00000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, name, payload)

    monkeypatch.setattr(ckpt, "_write_one", full_disk)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        _train_in_process(run, ["train.max_steps=3", "checkpoint.every=1"], monkeypatch)
    msg = str(err.value)
    assert "optimizer.pt: no space left on device (ENOSPC)" in msg and "step_00000001" in msg and "\n" not in msg
    assert err.value.exit_code == ckpt.IO_EXIT_CODE == 74
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000001"]  # no temp dir, no half checkpoint
    assert ckpt.verify(str(run / "checkpoints" / "step_00000001"))
    assert not (run / rd.LOCK_NAME).read_text()  # the lock was released (empty holder)


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path, monkeypatch):
    from sparsetron.parallel.engine import DataParallelEngine

    real = DataParallelEngine.train_step
    calls = []

    def poisoned(self, batches, lr):  # the update itself goes bad on step 2 (finite loss and grad norm)
        out = real(self, batches, lr)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(iter(self.model.parameters())).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(DataParallelEngine, "train_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 2: embed.weight is not finite; checkpoint not written") as err:
        _train_in_process(run, ["train.max_steps=3", "checkpoint.every=1"], monkeypatch)
    assert err.value.exit_code == DIVERGED_EXIT_CODE
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000001"]


# ------------------------------------------------------------ training runs (subprocesses)
def test_concurrent_runs_name_reuse_overwrite_and_stale_lock(tmp_path):
    run = tmp_path / "run"
    args = [*BASE, f"run_dir={run}", "train.max_steps=500", "checkpoint.every=4", "resume=auto"]
    first = _popen(args)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists(), first)  # training (and its handlers) under way
        holder = json.loads((run / rd.LOCK_NAME).read_text())
        second = run_cli([*BASE, f"run_dir={run}", "train.max_steps=3", "resume=auto"], check=False)
        assert second.returncode == 2
        assert f"is in use by pid {first.pid} on host {holder['host']}" in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGUSR1)  # the first run is unharmed: it checkpoints and exits for requeue
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == REQUEUE_EXIT_CODE, err
    assert "resume=auto: no checkpoint in" in out and "starting from scratch" in out
    old_id = json.loads((run / rd.IDENTITY).read_text())["run_id"]
    old_metrics = (run / "metrics.jsonl").read_bytes()
    old_ckpts = sorted(os.listdir(run / "checkpoints"))

    reuse = run_cli([*BASE, f"run_dir={run}", "train.max_steps=2"], check=False)  # resume=none, same name
    assert reuse.returncode == 2
    assert "already holds a run" in reuse.stderr and "use resume=auto to continue" in reuse.stderr
    assert (run / "metrics.jsonl").read_bytes() == old_metrics and sorted(os.listdir(run / "checkpoints")) == old_ckpts

    both = run_cli([*BASE, f"run_dir={run}", "overwrite=true", "resume=auto"], check=False)
    assert both.returncode == 2 and "cannot be combined with resume=auto" in both.stderr

    fresh = run_cli([*BASE, f"run_dir={run}", "train.max_steps=2", "overwrite=true"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and "moved the previous run" in fresh.stdout
    assert (aside[0] / "metrics.jsonl").read_bytes() == old_metrics  # moved, not deleted
    assert sorted(os.listdir(aside[0] / "checkpoints")) == old_ckpts
    assert json.loads((aside[0] / rd.IDENTITY).read_text())["run_id"] == old_id
    assert json.loads((run / rd.IDENTITY).read_text())["run_id"] != old_id
    assert sorted(read_metrics(str(run))["train"]) == [1, 2]  # nothing of the old run's curve

    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / rd.LOCK_NAME).write_text(json.dumps({"host": holder["host"], "pid": dead.pid, "started": "x"}))
    resumed = run_cli([*BASE, f"run_dir={run}", "train.max_steps=3", "resume=auto"])
    assert f"taking over the stale lock of pid {dead.pid}" in resumed.stdout and "resumed at step 2" in resumed.stdout


def test_an_unwritable_checkpoint_dir_is_refused_at_start(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run_cli([*BASE, f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'a_file' / 'ckpt'}",
                    "train.max_steps=2"], check=False)
    assert proc.returncode == ckpt.IO_EXIT_CODE
    assert proc.stderr.strip().splitlines()[-1] == (f"error: checkpoint dir {tmp_path / 'a_file' / 'ckpt'} is not "
                                                    f"writable: Not a directory (ENOTDIR)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_damaged_newest_checkpoints_fall_back_with_identical_losses(tmp_path):
    run = tmp_path / "run"
    common = [*BASE, f"run_dir={run}", "train.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=4"]
    run_cli(common)
    before = _losses(run, range(5, 9))
    ck = run / "checkpoints"
    model = ck / "step_00000008" / "model.safetensors"
    _scribble(model, model.stat().st_size // 2, os.urandom(4096))  # random bytes, size unchanged
    opt = ck / "step_00000006" / "optimizer.pt"
    _scribble(opt, opt.stat().st_size // 2, bytes(4096))  # zeros
    out = run_cli([*common, "resume=auto"])
    skips = [line for line in out.stdout.splitlines() if "skipping checkpoint" in line]
    assert len(skips) == 2
    assert "step_00000008" in skips[0] and "model.safetensors: checksum mismatch" in skips[0]
    assert "step_00000006" in skips[1] and "optimizer.pt: checksum mismatch" in skips[1]
    assert "resumed at step 4" in out.stdout
    assert _losses(run, range(5, 9)) == before
    for path in ckpt.list_complete(str(ck)):
        assert ckpt.verify(path)


def test_nan_steps_are_skipped_then_the_run_stops_with_its_own_exit_code(tmp_path):
    run = tmp_path / "run"
    args = [*BASE, f"run_dir={run}", "train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last=8",
            "train.max_skipped_steps=3"]
    proc = run_cli(args, check=False, env={"SPARSETRON_FAULT_NAN_STEPS": "2,4-6"})
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-2000:]
    assert "step 2: non-finite loss=nan grad_norm=nan; optimizer step skipped (1 in a row" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 6: 3 optimizer steps in a row (steps 4-6)")
    ck = run / "checkpoints"
    assert [os.path.basename(p) for p in ckpt.list_complete(str(ck))] == [f"step_{s:08d}" for s in range(1, 6)]
    same = [ckpt.read_tensors(str(ck / f"step_{s:08d}"), "model.safetensors") for s in (3, 5)]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])  # skipped steps 4-5 changed nothing
    assert all(torch.isfinite(t).all() for t in same[1].values())
    train = read_metrics(str(run))["train"]
    assert train[5]["skipped_steps"] == 3 and torch.isfinite(torch.tensor(train[3]["loss"]))


def test_tp2_shards_nan_skip_and_one_damaged_rank_shard(tmp_path):
    run = tmp_path / "run"
    common = [*BASE, f"run_dir={run}", "parallel.tp=2", "train.max_steps=6", "checkpoint.every=2",
              "checkpoint.keep_last=3"]
    first = run_cli(common, nproc=2, env={"SPARSETRON_FAULT_NAN_STEPS": "3"})
    assert first.stdout.count("step 3: non-finite loss=nan") == 1  # rank 0 reports, every rank skipped
    before = _losses(run, (5, 6))
    newest = run / "checkpoints" / "step_00000006"
    listed = json.loads((newest / ckpt.COMPLETE).read_text())["files"]
    shards = sorted(n for n in listed if n.startswith("model") and n.endswith(".safetensors"))
    assert len(shards) == 2  # both tp ranks' files are in the manifest
    _scribble(newest / shards[1], 200, os.urandom(256))  # tp rank 1's shard only
    out = run_cli([*common, "resume=auto"], nproc=2)
    assert f"skipping checkpoint step_00000006: {newest}: {shards[1]}: checksum mismatch" in out.stdout
    assert "resumed at step 4" in out.stdout
    assert _losses(run, (5, 6)) == before


# ------------------------------------------------------------------- signals (launch/torchrun.sh)
LAUNCH = Path(__file__).resolve().parents[1] / "launch"

SIGNAL_WORKER = """
import datetime, faulthandler, os, sys, time
log = os.environ["FAKE_LOG"]
trace = open(os.path.join(log, f"trace{os.environ['RANK']}"), "a", buffering=1)  # what each rank did, for failures
faulthandler.enable(trace)
import torch.distributed as dist
from sparsetron.train.resilience import (PreemptionHandler, REQUEUE_EXIT_CODE, defer_preemption_signals,
                                         note_exit_status)

defer_preemption_signals()  # as train(): gloo's threads start with the signals blocked, and never get them
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
handler = PreemptionHandler().install()
rank = dist.get_rank()
open(os.path.join(log, f"ready{rank}"), "w").write(str(os.getpid()))
trace.write("ready\\n")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)  # one "step"
    if handler.stop_agreed():
        handler.stop_listening()
        trace.write(f"stopped {handler.signal_name}\\n")
        with open(os.path.join(log, "stops"), "a") as f:
            f.write(f"{rank} {handler.signal_name}\\n")
        note_exit_status(REQUEUE_EXIT_CODE)
        dist.barrier()  # the "checkpoint": one more collective, as the trainer's save
        trace.write("exit 75\\n")
        dist.destroy_process_group()
        sys.exit(REQUEUE_EXIT_CODE)
trace.write("deadline\\n")
sys.exit(3)
"""


def _launch_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("TORCHRUN", "NNODES")}
    env.update(FAKE_LOG=str(tmp_path), PYTHON=sys.executable, SPARSETRON_TRACE_DIR=str(tmp_path / "trace"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", **extra)
    return env


def _children(pid):
    from sparsetron.launch.agent import child_pids

    return list(child_pids(pid))


@pytest.mark.parametrize("target", ["torchrun", "one_worker", "all"])
def test_a_signal_to_any_process_checkpoints_once_and_exits_75(tmp_path, target):
    (tmp_path / "sig_worker.py").write_text(SIGNAL_WORKER)
    env = _launch_env(tmp_path, NPROC="2", TRAIN_MODULE="sig_worker")
    job = subprocess.Popen([str(LAUNCH / "torchrun.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        _wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in range(2)), job, timeout=90)
        agent = _children(job.pid)
        assert len(agent) == 1
        workers = [int((tmp_path / f"ready{r}").read_text()) for r in range(2)]
        assert sorted(_children(agent[0])) == sorted(workers)  # the agent is torchrun: workers are its children
        if target == "torchrun":
            targets = agent
        elif target == "one_worker":
            targets = workers[1:]
        else:  # what Slurm does without B: every process of the step
            targets = [job.pid, *agent, *workers]
        for pid in targets:
            os.kill(pid, signal.SIGUSR1)
        _, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
        for pid in locals().get("agent", []) + locals().get("workers", []):  # never leave a worker behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    traces = {r: (tmp_path / f"trace{r}").read_text() for r in range(2) if (tmp_path / f"trace{r}").exists()}
    assert job.returncode == REQUEUE_EXIT_CODE, (err, traces)
    stops = sorted((tmp_path / "stops").read_text().splitlines())
    if stops != ["0 SIGUSR1", "1 SIGUSR1"]:  # each rank stopped once, and names the same signal
        pytest.fail(f"stops {stops}, rank traces {traces}\n{err[-4000:]}")


def test_preempting_one_training_rank_checkpoints_and_resumes(tmp_path):
    """The real trainer: SIGUSR1 to rank 1 only. Every rank agrees, rank 0 names the signal, one
    checkpoint at that step, exit 75 through torchrun; resume=auto continues with identical losses."""
    run = tmp_path / "run"
    # a constant LR: the schedule must not depend on max_steps, which differs between the runs below
    common = [*BASE, f"run_dir={run}", "checkpoint.every=0", "checkpoint.save_final=true", "optim.schedule=constant"]
    env = _launch_env(tmp_path, NPROC="2")
    job = subprocess.Popen([str(LAUNCH / "torchrun.sh"), *common, "train.max_steps=300"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists(), job, timeout=120)
        agent = _children(job.pid)[0]
        workers = _children(agent)
        rank1 = [p for p in workers if "LOCAL_RANK=1" in open(f"/proc/{p}/environ").read().replace("\0", " ") + " "]
        os.kill(rank1[0], signal.SIGUSR1)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    lines = [line for line in out.splitlines() if "for requeue" in line]
    assert len(lines) == 1 and lines[0].startswith("sparsetron: SIGUSR1 at step "), out[-2000:]
    stopped = int(lines[0].split("at step ")[1].split(":")[0])
    assert [os.path.basename(p) for p in ckpt.list_complete(str(run / "checkpoints"))] == [f"step_{stopped:08d}"]
    straight = tmp_path / "straight"
    end = stopped + 2
    run_cli([*BASE, f"run_dir={straight}", "checkpoint.every=0", "optim.schedule=constant", f"train.max_steps={end}"],
            nproc=2)
    resumed = run_cli([*common, f"train.max_steps={end}", "resume=auto"], nproc=2)
    assert f"resumed at step {stopped}" in resumed.stdout
    assert _losses(run, range(1, end + 1)) == _losses(straight, range(1, end + 1))


def test_zero3_skips_nan_steps_on_every_rank_and_stops_with_65_through_torchrun_sh(tmp_path):
    run = tmp_path / "run"
    env = _launch_env(tmp_path, NPROC="2", DS_ACCELERATOR="cpu", SPARSETRON_FAULT_NAN_STEPS="3-4")
    proc = subprocess.run([str(LAUNCH / "torchrun.sh"), *BASE, f"run_dir={run}", "parallel.zero_stage=3",
                           "train.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=6",
                           "train.max_skipped_steps=2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-3000:]  # the workers' code, not torchrun's 1
    assert "step 3: non-finite loss=nan" in proc.stdout
    assert "error: step 4: 2 optimizer steps in a row (steps 3-4)" in proc.stderr
    ck = run / "checkpoints"
    assert [os.path.basename(p) for p in ckpt.list_complete(str(ck))] == [f"step_{s:08d}" for s in (1, 2, 3)]
    weights = [ckpt.read_tensors(str(ck / f"step_{s:08d}"), "model.safetensors") for s in (2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # DeepSpeed skipped step 3


FULL_DISK_ON_RANK1 = """
import errno, os
if os.environ.get("RANK") == "1":  # a test-only patch, loaded by the workers through PYTHONPATH
    from sparsetron.train import checkpoint as ckpt
    real = ckpt._write_one
    def full(path, name, payload):
        if ".tmp-step_00000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, name, payload)
    ckpt._write_one = full
"""


def test_disk_full_on_one_rank_stops_every_rank_with_74_and_keeps_the_previous(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FULL_DISK_ON_RANK1)
    run = tmp_path / "run"
    proc = subprocess.run([str(LAUNCH / "torchrun.sh"), *BASE, f"run_dir={run}", "parallel.tp=2", "train.max_steps=6",
                           "checkpoint.every=2"], env=_launch_env(tmp_path, NPROC="2"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == ckpt.IO_EXIT_CODE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any("model-tp01-pp00.safetensors: no space left on device (ENOSPC)" in e for e in errors), errors  # rank 1
    assert any("another rank failed" in e for e in errors), errors  # rank 0: the same stop, not a hang
    assert all("step_00000002" in e for e in errors)  # both name the intact checkpoint
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002"]
    assert ckpt.verify(str(run / "checkpoints" / "step_00000002"))
