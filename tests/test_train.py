"""End-to-end: the training app as a user runs it (subprocesses), on the default data."""

import os
import signal
import subprocess
import sys
import time

import pytest
from sparsetron.tests.helpers import TINY, run_cli

from sparsetron.train.metrics import read_metrics


def _losses(run_dir, kind="train"):
    m = read_metrics(str(run_dir))[kind]
    return [m[s]["loss"] for s in sorted(m)]


def test_loss_falls_on_default_data(tmp_path):
    run = tmp_path / "run"
    run_cli([*TINY, f"run_dir={run}", "train.max_steps=40", "train.eval_every=20", "logging.plot=true"])
    val = read_metrics(str(run))["val"]
    assert val[40]["loss"] < val[0]["loss"] - 1.0, val
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "checkpoints" / "step_00000040" / "COMPLETE").exists()


def test_two_ranks_match_one_rank(tmp_path):
    """torchrun with 2 gloo ranks (micro 4, no accumulation) = 1 process (micro 4, 2 accumulation steps)."""
    common = [*TINY, "train.max_steps=5", "train.eval_every=5", "checkpoint.every=0"]
    run_cli([*common, f"run_dir={tmp_path / 'one'}"])
    run_cli([*common, f"run_dir={tmp_path / 'two'}"], nproc=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    assert abs(_losses(tmp_path / "one", "val")[-1] - _losses(tmp_path / "two", "val")[-1]) < 1e-4


def test_kill_9_then_resume_auto_reproduces_losses_exactly(tmp_path):
    common = [*TINY, "train.max_steps=14", "train.eval_every=0", "checkpoint.every=4", "checkpoint.keep_last=2"]
    run_cli([*common, f"run_dir={tmp_path / 'straight'}"])
    reference = _losses(tmp_path / "straight")

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparsetron.train", *common, f"run_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:  # kill after the step-8 checkpoint, mid-way to the next one
        if (run / "checkpoints" / "step_00000008" / "COMPLETE").exists() and metrics.exists() \
                and metrics.read_text().count('"kind": "train"') >= 9:
            break
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_losses(run)) < 14
    # on a loaded machine the kill can land after the step-12 checkpoint too: resume from the newest complete one
    newest = max(int(p.parent.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*/COMPLETE"))
    assert newest in (8, 12)

    out = run_cli([*common, f"run_dir={run}", "resume=auto"])
    assert f"resumed at step {newest}" in out.stdout
    assert _losses(run) == reference  # bit-exact


def test_resume_refuses_a_different_model(tmp_path):
    run = tmp_path / "run"
    run_cli([*TINY, f"run_dir={run}", "train.max_steps=2", "train.eval_every=0"])
    out = run_cli([*TINY, f"run_dir={run}", "train.max_steps=4", "resume=auto", "model.ffn_dim=192"], check=False)
    assert out.returncode == 2
    assert "model.ffn_dim=128" in out.stderr and "Traceback" not in out.stderr
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE").exists()  # nothing lost


@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    out = run_cli(["-m", *TINY, "train.max_steps=2", "train.eval_every=0", "checkpoint.save_final=false",
                   "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=str(tmp_path))
    for job in ("0", "1"):
        assert len(_losses(tmp_path / "sweep" / job)) == 2, out.stdout


def test_export_cli_from_a_training_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from sparsetron.train.export import load_model_from_checkpoint, main

    run = tmp_path / "run"
    run_cli([*TINY, f"run_dir={run}", "train.max_steps=2", "train.eval_every=0"])
    step = run / "checkpoints" / "step_00000002"
    assert main([str(step), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    ours = load_model_from_checkpoint(str(step)).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert main([str(run / "checkpoints" / "nope"), str(tmp_path / "x")]) == 2


def test_model_is_built_on_the_gpu_only_when_it_fits_and_nothing_offloads(monkeypatch):
    """A GPU run builds the full model on the GPU (fast) only if its fp32 weights take < half the free
    memory; a model bigger than that (TP/PP shard it later) and ZeRO-3 / offload runs build on the CPU."""
    import torch

    from sparsetron.train.cli import compose
    from sparsetron.train.metrics import parameter_counts
    from sparsetron.train.trainer import init_device as place

    def init_device(cfg, device):
        return place(cfg, device, parameter_counts(cfg.model, cfg.attention, cfg.moe)["total"])

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    small = compose(["model=125m"], run_dir="/nonexistent")  # ~0.5 GB of fp32 weights
    free["bytes"] = 10 * 2**30
    assert init_device(small, gpu) == gpu and init_device(small, cpu) == cpu
    free["bytes"] = 2**29  # 0.5 GiB free: ~0.5 GB of weights is more than half of it
    assert init_device(small, gpu) == cpu
    big = compose(["model=8b"], run_dir="/nonexistent")  # 29.9 GiB of fp32 weights
    free["bytes"] = 80 * 2**30
    assert init_device(big, gpu) == gpu
    free["bytes"] = 50 * 2**30  # half of it is less than the weights
    assert init_device(big, gpu) == cpu
    for override in ("parallel.zero_stage=3", "parallel.offload_optimizer=cpu"):
        assert init_device(compose(["model=125m", override], run_dir="/nonexistent"), gpu) == cpu, override
