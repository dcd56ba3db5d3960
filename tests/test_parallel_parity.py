"""Every layout trains like one process: the first 5 losses, grad norms, an eval loss and the final
weights (consolidated from all shards) match a single-process run on the same global batches.

One torchrun job per world size runs many layouts in sequence (sparsetron.tests.parallel_harness), so
process start-up is paid once. CPU, gloo, fp32."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sparsetron.parallel.runtime import Runtime
from sparsetron.tests.parallel_harness import run_layout

STEPS = 5
# Tolerances: no layout is bit-equal in general (a split matmul or an all-reduce sums in another
# order), but all agree to a few float32 ulps; same-layout resume is bit-exact (test_parallel_checkpoint).

TWO_RANKS = {
    "tp2": ["parallel.tp=2"],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2-gpipe": ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "pp2-1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "pp2-interleaved_1f1b": ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    "pp2-zero_bubble": ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"],
    "pp2-zbv": ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
    "pp2-uneven-1f1b": ["parallel.pp=2", "parallel.pp_layers=[1,3]"],
    "dp2-ddp": [],
    "ds-z0-dp2": ["parallel.engine=deepspeed"],
    "ds-z1-dp2": ["parallel.zero_stage=1"],
    "ds-z2-dp2": ["parallel.zero_stage=2"],
    "ds-z3-dp2": ["parallel.zero_stage=3"],
    "ds-z3-dp2-cpu-offload": ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu", "parallel.offload_param=cpu"],
}
FOUR_RANKS = {
    "tp2xdp2": ["parallel.tp=2"],
    "pp2xdp2": ["parallel.pp=2"],
    "tp2xpp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2xpp2-sp-interleaved": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                               "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
    "pp2xdp2-zero1": ["parallel.pp=2", "parallel.zero_stage=1"],
    "ds-tp2xdp2-z1": ["parallel.tp=2", "parallel.zero_stage=1"],
    "ds-tp2xdp2-z3-sp-cpu-offload": ["parallel.tp=2", "parallel.zero_stage=3", "parallel.sequence_parallel=true",
                                     "parallel.offload_optimizer=cpu"],
    "dp4-ddp": [],
}


def _torchrun_layouts(tmp_path, nproc, layouts, timeout=600):
    out = tmp_path / f"results{nproc}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "sparsetron.tests.parallel_harness", str(out), json.dumps(list(layouts.items())), str(STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return run_layout([], Runtime(), STEPS)


def _compare(name, got, ref):
    assert len(got["losses"]) == STEPS
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) <= 2e-6 * abs(b), (name, got["losses"], ref["losses"])
    for a, b in zip(got["grad_norms"], ref["grad_norms"]):
        assert abs(a - b) <= 1e-5 * abs(b), (name, got["grad_norms"], ref["grad_norms"])
    assert abs(got["eval"] - ref["eval"]) <= 2e-6 * abs(ref["eval"]), name
    assert got["state"].keys() == ref["state"].keys(), name
    for key, want in ref["state"].items():
        have = got["state"][key]
        assert have.shape == want.shape, (name, key)
        # Adam's first steps move every weight by ~lr whatever the gradient's size, so float noise in
        # near-zero gradients can show up as ~1e-5 here; a wrong shard or sync is >= lr = 3e-3
        assert (have - want).abs().max().item() <= 5e-5, (name, key, (have - want).abs().max().item())
    moved = max((want - b).abs().max().item() for want, b in zip(ref["state"].values(), ref["initial"].values()))
    assert moved > 1e-3  # training moved the weights: the comparison above is not vacuous


@pytest.fixture(scope="module")
def reference_with_initial(reference):
    from sparsetron.tests.parallel_harness import compose_layout
    from sparsetron.train.model import Llama

    cfg = compose_layout([])
    torch.manual_seed(cfg.train.seed)
    reference["initial"] = {k: v for k, v in Llama(cfg.model).state_dict().items() if k in reference["state"]}
    return reference


@pytest.mark.slow
def test_two_rank_layouts_match_one_process(tmp_path, reference_with_initial):
    results = _torchrun_layouts(tmp_path, 2, TWO_RANKS)
    for name in TWO_RANKS:
        _compare(name, results[name], reference_with_initial)


@pytest.mark.slow
def test_four_rank_layouts_match_one_process(tmp_path, reference_with_initial):
    results = _torchrun_layouts(tmp_path, 4, FOUR_RANKS)
    for name in FOUR_RANKS:
        _compare(name, results[name], reference_with_initial)


# bf16 autocast: the last stage's output meta must be inferred under the step's autocast (bf16 logits);
# torch 2.11 (the GPU image) then rejects fp32 meta on that rank alone and the other stages hang.
BF16_TWO_RANKS = {
    "pp2-1f1b-bf16": ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.precision=bf16"],
    "pp2-zero_bubble-bf16": ["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "train.precision=bf16"],
}


@pytest.mark.slow
def test_pipeline_under_bf16_autocast_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    ref = run_layout(["train.precision=bf16"], Runtime(), STEPS)
    results = _torchrun_layouts(tmp_path, 2, BF16_TWO_RANKS)
    for name in BF16_TWO_RANKS:
        got = results[name]
        assert len(got["losses"]) == STEPS
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-2 * abs(b), (name, got["losses"], ref["losses"])  # bf16 rounding, not a bug's size
        assert abs(got["eval"] - ref["eval"]) <= 1e-2 * abs(ref["eval"]), name


def _aio_usable() -> str:
    """'' when DeepSpeed's async-I/O op (NVMe offload) is loadable here, else the reason. The op is
    built here, in one process, before the ranks start (two ranks JIT-building it at once crash);
    the build is cached in ~/.cache/torch_extensions (minutes on 2 cores the first time)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return "DeepSpeed's async_io op cannot build (libaio headers missing: apt-get install libaio-dev)"
        builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001 (any import/build failure means: skip with its text)
        return f"DeepSpeed async_io unavailable: {type(err).__name__}: {err}"
    return ""


@pytest.mark.slow
def test_zero3_nvme_offload_matches_one_process(tmp_path, reference_with_initial):
    reason = _aio_usable()
    if reason:
        pytest.skip(reason)
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    layouts = {"ds-z3-dp2-nvme-offload": ["parallel.zero_stage=3", "parallel.offload_optimizer=nvme",
                                          "parallel.offload_param=nvme", f"parallel.nvme_path={nvme}"]}
    results = _torchrun_layouts(tmp_path, 2, layouts, timeout=900)
    _compare("ds-z3-dp2-nvme-offload", results["ds-z3-dp2-nvme-offload"], reference_with_initial)


@pytest.mark.slow
def test_expert_parallel_moe_matches_one_process(tmp_path):
    """EP=2 (carved out of DP=2): experts sharded, tokens exchanged by all-to-all; the expert
    gradients reduce over the expert-dp group; the consolidated experts equal one process's."""
    from sparsetron.tests.parallel_harness import compose_layout
    from sparsetron.train.model import Llama

    moe = ["model.mlp=moe", "moe.implementation=torch"]
    torch.set_num_threads(1)
    ref = run_layout(moe, Runtime(), STEPS)
    cfg = compose_layout(moe)
    torch.manual_seed(cfg.train.seed)
    ref["initial"] = {k: v for k, v in Llama(cfg.model, cfg.attention, cfg.moe).state_dict().items() if k in ref["state"]}
    results = _torchrun_layouts(tmp_path, 2, {"ep2xdp2-moe": [*moe, "parallel.ep=2"], "dp2-moe": moe})
    for name in ("ep2xdp2-moe", "dp2-moe"):
        _compare(name, results[name], ref)
