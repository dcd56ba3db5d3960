"""Preemption flag, watchdog, and the bash launch plumbing (CPU only, a few seconds)."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sparsetron.parallel.slurm_env import apply_slurm_env, expand_nodelist
from sparsetron.train.resilience import (
    REQUEUE_EXIT_CODE,
    WATCHDOG_EXIT_CODE,
    PreemptionHandler,
    Watchdog,
    dist_timeout,
    STACK_DUMP_SIGNAL,
)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _bash(script: str, env=None, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- PreemptionHandler -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_uninstall_restores(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop
        os.kill(os.getpid(), sig)
        for _ in range(100):  # Python runs the handler at the next bytecode boundary
            if handler.should_stop:
                break
            time.sleep(0.01)
        assert handler.should_stop
        assert handler.signal_name == signal.Signals(sig).name
        # Without a process group the agreement is the local flag.
        assert handler.stop_agreed() is True
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) is before


def test_stop_listening_ignores_duplicates():
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler(signals=(signal.SIGUSR1,)).install()
    try:
        handler.stop_listening()
        os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process under SIG_DFL
        time.sleep(0.05)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_handler_rejects_empty_signal_list():
    with pytest.raises(ValueError, match="signals"):
        PreemptionHandler(signals=())


AGREE_WORKER = """
import json, os, sys
import torch.distributed as dist
from sparsetron.train.resilience import PreemptionHandler

rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
handler = PreemptionHandler()
first = handler.stop_agreed()  # nobody signalled yet
if rank == 1:
    handler.request_stop()  # as if only node 1 got SIGUSR1
second = handler.stop_agreed()
open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps([first, second]))
dist.destroy_process_group()
"""


def test_stop_agreed_all_reduces_across_ranks(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "init"), str(tmp_path)],
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True]


def test_dist_timeout_reads_env(monkeypatch):
    monkeypatch.setenv("SPARSETRON_DIST_TIMEOUT_S", "42")
    assert dist_timeout().total_seconds() == 42
    monkeypatch.setenv("SPARSETRON_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="SPARSETRON_DIST_TIMEOUT_S"):
        dist_timeout()


# --- Watchdog ------------------------------------------------------------------------------


def test_watchdog_rejects_bad_periods():
    with pytest.raises(ValueError, match="timeout_s"):
        Watchdog(timeout_s=0)
    with pytest.raises(ValueError, match="heartbeat_s"):
        Watchdog(heartbeat_s=-1)


def test_hang_message_names_region_and_step():
    wd = Watchdog(timeout_s=10, rank=5)  # thread not started: message only
    wd.beat(12)
    with wd.collective("all_gather params"):
        msg = wd.hang_message(now=time.monotonic() + 3.0)
        assert msg.startswith("rank 5 hung in all_gather params at step 12 for ")
        assert float(msg.split(" for ")[1].split()[0]) >= 3.0
    msg = wd.hang_message()
    assert "no collective; last finished: all_gather params" in msg


def test_heartbeat_line_appears():
    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test_resilience.heartbeat")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    with Watchdog(timeout_s=60, heartbeat_s=0.1, rank=2, logger=logger) as wd:
        wd.beat(5)
        time.sleep(0.45)
    beats = [r for r in records if r.startswith("heartbeat rank=2 step=5 ")]
    assert len(beats) >= 2, records


HANG_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from sparsetron.train.resilience import Watchdog
    wd = Watchdog(timeout_s=1.0, heartbeat_s=100, rank=3).start()
    for step in range(8):            # healthy steps over 2x the timeout: no false alarm
        time.sleep(0.25)
        wd.beat(step)
    with wd.suspended():             # a long save is not a hang
        time.sleep(1.6)
    wd.beat(7)
    print("entering collective", flush=True)
    with wd.collective("all_reduce grads"):
        time.sleep(60)               # the hang
    print("not reached", flush=True)
    """
)


def test_watchdog_exits_on_hung_collective():
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANG_SCRIPT], capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == WATCHDOG_EXIT_CODE, proc.stderr
    assert "entering collective" in proc.stdout and "not reached" not in proc.stdout
    assert "rank 3 hung in all_reduce grads at step 7 for " in proc.stderr
    hung_for = float(proc.stderr.split("at step 7 for ")[1].split()[0])
    assert 1.0 <= hung_for < 2.5
    assert "time.sleep" in proc.stderr or "<string>" in proc.stderr  # thread stacks dumped
    # 2 s of beats + 1.6 s suspended + timeout 1 s + interpreter start; margin for 2 slow cores.
    assert elapsed < 12


STUCK_HOLDING_GIL = textwrap.dedent(
    """
    import re, sys
    from sparsetron.train.resilience import enable_stack_dumps
    enable_stack_dumps(sys.argv[1])
    def stuck_in_c_code():                           # catastrophic backtracking: C code, GIL held
        re.fullmatch(r"(a+)+$", "a" * 64 + "b")
    print("ready", flush=True)
    stuck_in_c_code()
    """
)


def test_stack_dump_answers_while_gil_is_held(tmp_path):
    """A rank stuck in GIL-holding C code (the pipeline hang's last stage) still reports where it is."""
    path = tmp_path / "stacks" / "rank0.txt"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_HOLDING_GIL, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(STACK_DUMP_SIGNAL)
        deadline = time.monotonic() + 10
        while "stuck_in_c_code" not in (path.read_text() if path.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None  # the signal reports, it does not stop the rank
    finally:
        proc.kill()
        proc.wait()
    assert "stuck_in_c_code" in path.read_text()


# --- bash helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a,b", ["a", "b"]),
        ("gpu-1", ["gpu-1"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
        ("x[9-11],y", ["x9", "x10", "x11", "y"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    proc = _bash(f'source "{LAUNCH}/lib.sh"; expand_nodelist "{nodelist}"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == hosts
    proc = _bash(f'source "{LAUNCH}/lib.sh"; first_host "{nodelist}"',
                 env={"PATH": "/usr/bin:/bin"})
    assert proc.stdout.strip() == hosts[0]


@pytest.mark.parametrize("bad", ["n[a-b]", "n[1-2", ""])
def test_expand_nodelist_rejects_bad_lists(bad):
    proc = _bash(f'source "{LAUNCH}/lib.sh"; expand_nodelist "{bad}"')
    assert proc.returncode != 0 and "expand_nodelist" in proc.stderr
    with pytest.raises(ValueError, match="nodelist"):
        expand_nodelist(bad)


@pytest.mark.parametrize("nodelist", ["node[01-03,07]", "a,b", "gpu-1", "r[1-2]-n[08-09]",
                                      "x[9-11],y", "gpu[098-101],login[1]"])
def test_python_and_bash_nodelist_parsers_agree(nodelist):
    proc = _bash(f'source "{LAUNCH}/lib.sh"; expand_nodelist "{nodelist}"')
    assert expand_nodelist(nodelist) == proc.stdout.split()


def test_apply_slurm_env_for_launches_without_torchrun():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123"}
    assert apply_slurm_env(env) is True
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "20123"}
    torchrun_env = {"RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert apply_slurm_env(torchrun_env) is False and torchrun_env["RANK"] == "3"


def test_first_host_prefers_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && echo from-scontrol\n')
    fake.chmod(0o755)
    proc = _bash(f'source "{LAUNCH}/lib.sh"; first_host "node[01-02]"',
                 env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert proc.stdout.strip() == "from-scontrol"


def test_exit_codes_match_bash():
    proc = _bash(f'source "{LAUNCH}/lib.sh"; '
                 'echo $SPARSETRON_REQUEUE_EXIT_CODE $SPARSETRON_WATCHDOG_EXIT_CODE')
    assert proc.stdout.split() == [str(REQUEUE_EXIT_CODE), str(WATCHDOG_EXIT_CODE)]


def test_env_sh_forces_multicast_off(tmp_path):
    env = dict(os.environ, NCCL_NVLS_ENABLE="1", NPROC="2", SPARSETRON_TRACE_DIR=str(tmp_path))
    env.pop("OMP_NUM_THREADS", None)
    proc = _bash(f'source "{LAUNCH}/env.sh"; echo $NCCL_NVLS_ENABLE $TORCH_SYMM_MEM_DISABLE_MULTICAST '
                 '$NVSHMEM_DISABLE_NVLS $TORCH_NCCL_ASYNC_ERROR_HANDLING $PYTHONUNBUFFERED '
                 '$OMP_NUM_THREADS $(nproc)', env=env)
    vals = proc.stdout.split()
    assert vals[:5] == ["0", "1", "1", "1", "1"]
    assert int(vals[5]) == max(1, int(vals[6]) // 2)


# --- launch scripts with fake torchrun / srun / scontrol --------------------------------------

FAKE_TORCHRUN = """#!{python}
# Records its arguments, runs one "worker", fails like torchrun if the worker fails.
import json, os, subprocess, sys
log = os.environ["FAKE_LOG"]
with open(os.path.join(log, "torchrun_args.json"), "w") as f:
    json.dump(sys.argv[1:], f)
worker = os.environ.get("FAKE_WORKER")
rc = subprocess.call([sys.executable, worker]) if worker else 0
with open(os.path.join(log, "torchrun_saw_worker_rc"), "w") as f:  # only if torchrun survived
    f.write(str(rc))
sys.exit(0 if rc == 0 else 1)
"""

FAKE_WORKER = """
import os, sys, time
from pathlib import Path
from sparsetron.train.resilience import PreemptionHandler, REQUEUE_EXIT_CODE
handler = PreemptionHandler().install()
log = Path(os.environ["FAKE_LOG"])
(log / "ready").write_text(str(os.getpid()))
deadline = time.monotonic() + 30
while not handler.should_stop and time.monotonic() < deadline:
    time.sleep(0.05)
handler.stop_listening()  # as the trainer does: the relayed duplicate must not kill the exit path
(log / "worker_exit").write_text(handler.signal_name)
sys.exit(REQUEUE_EXIT_CODE if handler.should_stop else 3)
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Runs the task locally as node 0. Like slurmstepd's process tracking, a relayed signal
# reaches every process of the step (task, torchrun, workers), not just the task.
source "{launch}/lib.sh"
signal_tree() {{ local c; for c in $(child_pids "$1"); do signal_tree "$c"; done; kill -USR1 "$1" 2>/dev/null; }}
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 "$@" &
child=$!
trap 'signal_tree $child' USR1
while true; do wait $child; rc=$?; kill -0 $child 2>/dev/null || exit $rc; done
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then source "{launch}/lib.sh"; expand_nodelist "$3"; fi
"""


def _fake_env(tmp_path, worker=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("torchrun", FAKE_TORCHRUN.format(python=sys.executable)),
                       ("srun", FAKE_SRUN.format(launch=LAUNCH)), ("scontrol", FAKE_SCONTROL.format(launch=LAUNCH))]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path),
               SPARSETRON_TRACE_DIR=str(tmp_path / "trace"), TORCHRUN="torchrun")  # the fake, not launch/agent.py
    # an in-process single-rank DeepSpeed run earlier in the session leaves MASTER_PORT/RANK/... in os.environ
    for key in [k for k in env if k.startswith("SLURM_")] + ["NNODES", "MASTER_ADDR", "MASTER_PORT", "NPROC", "RANK",
                                                              "LOCAL_RANK", "WORLD_SIZE"]:
        env.pop(key, None)
    if worker:
        (tmp_path / "worker.py").write_text(FAKE_WORKER)
        env["FAKE_WORKER"] = str(tmp_path / "worker.py")
    return env


def test_torchrun_sh_single_and_multi_node(tmp_path):
    env = _fake_env(tmp_path)
    proc = subprocess.run([str(LAUNCH / "torchrun.sh"), "model=125m", "parallel.dp=2"],
                          env=dict(env, NPROC="2"), capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    args = json.loads((tmp_path / "torchrun_args.json").read_text())
    assert "--standalone" in args and "--nproc-per-node=2" in args
    assert args[-4:] == ["-m", "sparsetron.train", "model=125m", "parallel.dp=2"]

    multi = dict(env, NNODES="2", MASTER_ADDR="node01", RDZV_ID="job7", RUN_DIR="/ckpt/run7")
    proc = subprocess.run([str(LAUNCH / "torchrun.sh"), "train.max_steps=3"], env=multi,
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    args = json.loads((tmp_path / "torchrun_args.json").read_text())
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29500",
            "--rdzv-id=job7", "--max-restarts=0"} <= set(args)
    assert "--standalone" not in args
    assert args[-2:] == ["train.max_steps=3", "hydra.run.dir=/ckpt/run7"]

    proc = subprocess.run([str(LAUNCH / "torchrun.sh")], env=dict(env, NNODES="2"),
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr


def test_sbatch_preemption_forwards_signal_and_requeues(tmp_path):
    env = _fake_env(tmp_path, worker=True)
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NAME="t", RUN_DIR=str(tmp_path / "run"),
               NPROC="1")
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "model=125m"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what Slurm does 120 s before the time limit
        _, err = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    assert (tmp_path / "worker_exit").read_text() == "SIGUSR1"
    assert (tmp_path / "torchrun_saw_worker_rc").read_text() == str(REQUEUE_EXIT_CODE)
    scontrol = (tmp_path / "scontrol.log").read_text().splitlines()
    assert "requeue 4242" in scontrol
    args = json.loads((tmp_path / "torchrun_args.json").read_text())
    port = 20000 + 4242 % 20000
    assert f"--rdzv-endpoint=node01:{port}" in args and "--rdzv-id=4242" in args
    assert args[-3:] == ["model=125m", "resume=auto", f"hydra.run.dir={tmp_path / 'run'}"]


REAL_WORKER = """
import os, sys, time
import torch.distributed as dist
from sparsetron.train.resilience import PreemptionHandler, REQUEUE_EXIT_CODE, defer_preemption_signals

defer_preemption_signals()  # as train(): gloo's threads keep the signals blocked, only this thread gets them
dist.init_process_group("gloo")
handler = PreemptionHandler().install()
rank, log = dist.get_rank(), os.environ["FAKE_LOG"]
open(os.path.join(log, f"ready{rank}"), "w").write(str(os.getpid()))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)  # one "step"
    if handler.stop_agreed():
        handler.stop_listening()
        open(os.path.join(log, f"stopped{rank}"), "w").write(handler.signal_name)
        dist.destroy_process_group()
        sys.exit(REQUEUE_EXIT_CODE)
sys.exit(3)
"""


def test_torchrun_sh_forwards_preemption_to_real_torchrun_workers(tmp_path):
    # The real torchrun: its direct children must be the workers, and it must survive.
    (tmp_path / "fake_train.py").write_text(REAL_WORKER)
    env = _fake_env(tmp_path)
    env.update(NPROC="2", TRAIN_MODULE="fake_train", TORCHRUN=f"{sys.executable} -m torch.distributed.run",
               PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    job = subprocess.Popen([str(LAUNCH / "torchrun.sh")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == REQUEUE_EXIT_CODE, err
    assert [(tmp_path / f"stopped{r}").read_text() for r in range(2)] == ["SIGUSR1", "SIGUSR1"]
