"""Shared by the end-to-end tests."""

import os
import subprocess
import sys


# A small model and corpus so that every end-to-end test runs in seconds on 2 CPU cores.
TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.vocab_size=512", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4",
    "data.max_corpus_bytes=400000", "train.eval_batches=2", "logging.wandb.mode=disabled",
    "logging.progress_bar=false", "logging.plot=false", "optim.warmup_steps=2",
]


def run_cli(args, cwd=None, nproc=1, timeout=300, check=True, env=None):
    """Run the training app as a user would (a subprocess), optionally under torchrun."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "sparsetron.train", *args]
    else:
        cmd = [sys.executable, "-m", "sparsetron.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
