"""ZeRO offload with DeepSpeed's CPU Adam (optim.offload_impl, issue 20): the default host optimizer,
parity with torch AdamW, checkpoints that resume exactly across the switch, the refusals (a switch
that cannot carry the state, a C++ op that cannot build), the tuned ZeRO keys and the host-RAM/disk
estimate that refuses a layout before any work. CPU, gloo, one process, the harness's tiny model."""

import os
import warnings

import pytest
import torch

from sparsetron.configs.schema.validate import ConfigError, validate
from sparsetron.parallel import deepspeed_config as dsc
from sparsetron.parallel.runtime import Runtime
from sparsetron.tests.helpers import TINY, run_cli
from sparsetron.tests.parallel_harness import compose_layout, rank_batches, run_layout

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ZERO3_CPU = ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu", "parallel.offload_param=cpu"]
STEPS = 4


def _engine(impl: str, extra=()):
    from sparsetron.parallel.engine import build_engine
    from sparsetron.train.model import Llama

    cfg = compose_layout([*ZERO3_CPU, f"optim.offload_impl={impl}", *extra])
    validate(cfg, 1)
    torch.manual_seed(cfg.train.seed)
    return cfg, build_engine(Llama(cfg.model), cfg, Runtime())


def _train(cfg, engine, first: int, last: int):
    from sparsetron.train.optim import lr_at

    return [engine.train_step(rank_batches(cfg, s, 0, 1), lr_at(s, cfg.optim, STEPS))["loss"] for s in range(first, last)]


def _inner(engine):
    return engine.ds.optimizer.optimizer  # ZeRO-3's wrapped optimizer: the one that holds Adam's state


def _state_copy(engine):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for st in _inner(engine).state.values()]


@pytest.fixture(scope="module")
def runs():
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    return {impl: run_layout([*ZERO3_CPU, f"optim.offload_impl={impl}"], Runtime(), STEPS)
            for impl in ("deepspeed_cpu_adam", "torch")}


def test_cpu_adam_is_the_default_host_optimizer_and_matches_torch_adamw(runs):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    fast, ref = runs["deepspeed_cpu_adam"], runs["torch"]
    assert type(_inner(fast["engine"])) is DeepSpeedCPUAdam and fast["engine"].optimizer_impl == "deepspeed_cpu_adam"
    assert type(_inner(ref["engine"])) is torch.optim.AdamW
    assert compose_layout(ZERO3_CPU).optim.offload_impl == "deepspeed_cpu_adam"
    # Same AdamW update (decoupled decay, bias correction, eps outside the sqrt); the C++ op computes
    # the bias corrections in fp32, multiplies by 1/sqrt(1 - beta2^t) instead of dividing and uses FMA:
    # a few float32 ulps per element per step. Over 4 steps that is ~1e-7 relative in the loss; a
    # wrong decay, missing bias correction or lost lr schedule changes it by > 1e-4.
    for a, b in zip(fast["losses"], ref["losses"]):
        assert abs(a - b) <= 2e-6 * abs(b), (fast["losses"], ref["losses"])
    for a, b in zip(fast["grad_norms"], ref["grad_norms"]):
        assert abs(a - b) <= 1e-5 * abs(b), (fast["grad_norms"], ref["grad_norms"])
    for key, want in ref["state"].items():
        # Adam moves each weight by ~lr = 3e-3 per step whatever the gradient's size; float noise in
        # near-zero gradients can show as ~1e-5 (as in test_parallel_parity); a wrong update is >= lr
        assert (fast["state"][key] - want).abs().max().item() <= 5e-5, key
    from sparsetron.train.model import Llama

    initial = compose_layout([])
    torch.manual_seed(initial.train.seed)
    start = Llama(initial.model).state_dict()
    moved = max((ref["state"][k] - start[k]).abs().max().item() for k in ref["state"])
    assert moved > 1e-3  # training moved the weights: the comparison is not vacuous


@pytest.mark.parametrize("src,dst", [("deepspeed_cpu_adam", "torch"), ("torch", "deepspeed_cpu_adam")])
def test_checkpoints_resume_exactly_across_the_switch(tmp_path, capsys, src, dst):
    """Adam's moments and step count carry over bit for bit; the resumed run continues as the
    uninterrupted one (within the two updates' ulp-level difference)."""
    torch.set_num_threads(1)
    cfg, a = _engine(src)
    straight = _train(cfg, a, 0, 2)
    a.save_checkpoint(str(tmp_path))
    saved = _state_copy(a)
    straight += _train(cfg, a, 2, STEPS)

    cfg2, b = _engine(dst)
    b.load_checkpoint(str(tmp_path))
    assert f"optim.offload_impl={src} with {dst}" in capsys.readouterr().out
    loaded = _state_copy(b)
    assert len(loaded) == len(saved) > 0
    for want, have in zip(saved, loaded):
        assert int(have["step"]) == int(want["step"]) == 2
        assert torch.equal(have["exp_avg"], want["exp_avg"]) and torch.equal(have["exp_avg_sq"], want["exp_avg_sq"])
    resumed = _train(cfg2, b, 2, STEPS)
    for x, y in zip(resumed, straight[2:]):
        assert abs(x - y) <= 2e-6 * abs(y), (resumed, straight)
    assert int(next(iter(_inner(b).state.values()))["step"]) == STEPS  # the count went on, not restarted


def _bare_engine(impl: str, offload_optimizer: str):
    """The switch rule alone (no DeepSpeed engine behind it)."""
    from sparsetron.parallel.deepspeed_engine import DeepSpeedEngine

    eng = DeepSpeedEngine.__new__(DeepSpeedEngine)
    eng.cfg = compose_layout(["parallel.zero_stage=3", f"parallel.offload_optimizer={offload_optimizer}"])
    eng.rt, eng.optimizer_impl = Runtime(), impl
    return eng


@pytest.mark.parametrize("saved,mine,offload", [("torch", "deepspeed_cpu_adam", "nvme"),
                                                ("deepspeed_json", "deepspeed_cpu_adam", "cpu"),
                                                ("deepspeed_cpu_adam", "deepspeed_json", "cpu")])
def test_a_switch_that_cannot_carry_the_state_is_refused_naming_both(saved, mine, offload):
    from sparsetron.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError) as err:
        _bare_engine(mine, offload)._check_optimizer_switch(saved, "/ckpt/step_2")
    msg = str(err.value)

    def said(impl):
        return "`optimizer` block in parallel.deepspeed_overrides" if impl == "deepspeed_json" else f"optim.offload_impl={impl}"

    assert f"written with {'an ' if saved == 'deepspeed_json' else ''}{said(saved)}" in msg, msg
    assert f"this run uses {'an ' if mine == 'deepspeed_json' else ''}{said(mine)}" in msg and "--weights-only" in msg
    _bare_engine(mine, offload)._check_optimizer_switch(mine, "/ckpt/step_2")  # no switch: nothing to refuse


def test_offload_impl_is_validated():
    cfg = compose_layout(["optim.offload_impl=fused"])
    with pytest.raises(ConfigError, match=r"optim.offload_impl: got 'fused', allowed: deepspeed_cpu_adam, torch"):
        validate(cfg, 1)


def test_an_op_that_cannot_build_fails_in_one_line_naming_the_switch(tmp_path):
    """A fresh extension cache and no usable C++ compiler: the notice, then one ConfigError line."""
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "/bin/false",
           "CC": "/bin/false"}
    proc = run_cli([*TINY, f"run_dir={tmp_path / 'run'}", "train.max_steps=1", "train.device=cpu", *ZERO3_CPU],
                   check=False, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "building DeepSpeed's CPU Adam op" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "optim.offload_impl: DeepSpeed's CPU Adam op cannot be built here" in proc.stderr
    assert "set optim.offload_impl=torch" in proc.stderr


# ------------------------------------------------------------------ tuning and memory estimate
def test_offload_keys_are_chosen_from_model_size_and_host_memory():
    cfg = compose_layout([*ZERO3_CPU])
    n = 7_000_000_000  # a 7B model (32 blocks of ~2e8 parameters)
    cfg.model.n_layers, cfg.model.dim = 32, 4096
    z = dsc.deepspeed_config(cfg, 1, torch.device("cpu"), n_params=n)["zero_optimization"]
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True
    assert z["reduce_bucket_size"] == z["stage3_prefetch_bucket_size"] == int(n / 32)  # one block
    assert z["stage3_param_persistence_threshold"] == 40960 and z["stage3_max_live_parameters"] == int(1e9)
    assert z["offload_optimizer"]["pin_memory"] is False  # no GPU: nothing to pin for
    line = dsc.offload_tuning_line({"zero_optimization": z})
    assert line.startswith("sparsetron: ZeRO offload settings") and "reduce_bucket_size=2.19e+08" in line
    tiny = dsc.deepspeed_config(cfg, 1, torch.device("cpu"), n_params=10_000)["zero_optimization"]
    assert tiny["reduce_bucket_size"] == int(5e6)  # floor: tiny buckets would mean thousands of transfers
    # a GPU of 24 GiB caps the buckets (4.5 buckets of 16-bit values within 2% of it)
    capped = dsc.offload_tuning(cfg, n, 1, torch.device("cpu"), gpu_bytes=24 * 2**30, host_available=2**40)
    assert capped["reduce_bucket_size"] == int(0.02 * 24 * 2**30 / 9)
    nvme = compose_layout(["parallel.zero_stage=3", "parallel.offload_optimizer=nvme", "parallel.offload_param=nvme"])
    nvme.model.n_layers = 32
    small_host = dsc.offload_tuning(nvme, n, 1, torch.device("cpu"), largest_param=131_072_000,
                                    host_available=16 * 2**30)
    assert small_host["sub_group_size"] == int(16 * 2**30 / 8 / 16)  # 4 fp32 swap buffers <= 1/8 of the RAM
    assert small_host["_param_buffer_size"] == 131_072_000  # the embedding must fit one swap buffer
    override = compose_layout([*ZERO3_CPU, "+parallel.deepspeed_overrides.zero_optimization.reduce_bucket_size=123"])
    assert dsc.deepspeed_config(override, 1, torch.device("cpu"), n_params=n)["zero_optimization"][
        "reduce_bucket_size"] == 123  # the user's override still wins


def test_pinned_buffers_only_when_the_host_can_spare_them(monkeypatch):
    cfg = compose_layout([*ZERO3_CPU])
    gpu = torch.device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    n = 1_000_000_000  # 18 GB of host states (bf16 parameters + fp32 master, moments, gradient)
    assert dsc.offload_tuning(cfg, n, 1, gpu, host_available=100 * 10**9)["_pin_memory"] is True
    assert dsc.offload_tuning(cfg, n, 1, gpu, host_available=20 * 10**9)["_pin_memory"] is False


def test_host_ram_estimate_refuses_a_layout_that_cannot_fit():
    cfg = compose_layout([*ZERO3_CPU])
    cfg.train.precision = "bf16"
    n = 7_000_000_000
    # 7B on one GPU: 16 B (fp32 master, m, v, gradient) + 2 B (the bf16 parameter) per parameter
    est = dsc.offload_memory_estimate(cfg, n, 1, 1, torch.device("cuda"))
    assert est["host_states"] == n * 18 and est["host_build"] == n * 4 and est["host"] == n * 18
    dsc.check_offload_fits(cfg, n, 1, local_world_size=1, host_available=n * 18)  # exactly fits: no error
    with pytest.raises(ConfigError) as err:
        dsc.check_offload_fits(cfg, n, 1, local_world_size=1, host_available=64 * 2**30)
    msg = str(err.value)
    assert msg.startswith("invalid config: parallel.offload_param:") and "\n" not in msg
    assert f"{est['host']:,} bytes" in msg and f"{64 * 2**30:,} bytes" in msg
    # 8 ranks on one node share its RAM: each builds the fp32 model before sharding (8 x 4 B x n)
    eight = dsc.offload_memory_estimate(cfg, n, 8, 8, torch.device("cuda"))
    assert eight["host_states"] == n * 18 and eight["host_build"] == 8 * 4 * n == eight["host"]
    # two nodes of 8: each holds half of the states
    assert dsc.offload_memory_estimate(cfg, n, 16, 8, torch.device("cuda"))["host_states"] == n * 9


def test_nvme_disk_estimate_refuses_a_disk_too_small(tmp_path):
    cfg = compose_layout(["parallel.zero_stage=3", "parallel.offload_optimizer=nvme", "parallel.offload_param=nvme",
                          f"parallel.nvme_path={tmp_path / 'not_yet'}"])
    n = 10_000_000_000
    with pytest.raises(ConfigError) as err:
        dsc.check_offload_fits(cfg, n, 1, local_world_size=1, host_available=2**50, disk_available=10**9)
    need = n * (12 + 4)  # fp32 master + moments, and the fp32 parameters (precision fp32 here)
    assert str(err.value).startswith("invalid config: parallel.nvme_path:") and f"{need:,} bytes" in str(err.value)
    assert dsc.disk_available_bytes(str(tmp_path / "not_yet" / "deeper")) > 0  # asks the existing parent's disk
    dsc.check_offload_fits(cfg, n, 1, local_world_size=1, host_available=2**50, disk_available=need)


def test_the_app_refuses_before_any_work(tmp_path):
    """A 70B-class model with CPU offload on this host: one line, exit 2, no run dir written."""
    big = ["model.dim=8192", "model.n_layers=80", "model.n_heads=64", "model.n_kv_heads=8", "model.ffn_dim=28672",
           "model.vocab_size=32000"]
    run = tmp_path / "run"
    proc = run_cli([*TINY, *big, f"run_dir={run}", "train.device=cpu", *ZERO3_CPU], check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "of host RAM on this node" in proc.stderr and "available" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_host_threads_share_the_cores_only_over_torchruns_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert dsc.host_threads_per_rank() is None  # not torchrun: the 1 is the user's choice
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert dsc.host_threads_per_rank() == 4  # 16 cores over 4 ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert dsc.host_threads_per_rank() is None  # the user's own value stays
