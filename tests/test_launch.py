"""Launching as a cluster would: a fake two-node SLURM job on one machine, and preemption."""

import os
import signal
import socket
import subprocess
import sys
import time

from sparsetron.tests.helpers import TINY, run_cli
from sparsetron.train.metrics import read_metrics
from sparsetron.train.resilience import REQUEUE_EXIT_CODE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(run_dir):
    m = read_metrics(str(run_dir))["train"]
    return [m[s]["loss"] for s in sorted(m)]


def test_fake_two_node_slurm_job_trains(tmp_path):
    """Two launcher processes, one per 'node', rendezvous on 127.0.0.1 as slurm.sbatch makes them."""
    run = tmp_path / "run"
    port = _free_port()
    procs = []
    for node in range(2):
        env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": str(node),
               "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NPROC": "1", "RUN_DIR": str(run), "OMP_NUM_THREADS": "1",
               "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
        procs.append(subprocess.Popen(
            ["bash", os.path.join(ROOT, "launch", "torchrun.sh"), *TINY, "train.max_steps=3", "train.eval_every=0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(_train_losses(run)) == 3
    assert "world 2" in "".join(outs)


def test_sigusr1_checkpoints_exits_for_requeue_and_resume_continues(tmp_path):
    common = [*TINY, "train.max_steps=10", "train.eval_every=0", "checkpoint.every=0"]
    run_cli([*common, f"run_dir={tmp_path / 'straight'}"])
    reference = _train_losses(tmp_path / "straight")

    run = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "sparsetron.train", *common, f"run_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended before the signal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    stopped_at = len(_train_losses(run))
    assert 3 <= stopped_at < 10
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").exists()

    run_cli([*common, f"run_dir={run}", "resume=auto"])
    assert _train_losses(run) == reference
