"""Context parallel (parallel/context_parallel.py) on gloo, fp32, tiny models.

- The zig-zag split and its positions (no processes).
- Chunked attention (`attend(..., q_offset)`, the seam CP runs on) against the rows of the whole
  sequence, output and every input gradient, on the Triton kernels (interpreter here) for NSA, MoBA
  and sliding window.
- One torchrun job per world size (2, 4) runs all of that world's checks, so process start-up is
  paid once: the CP attention function (K/V all-gather, dK/dV reduce-scatter) against the unsplit
  computation, output and q/k/v(/gates) gradients, at cp = world; then training layouts (cp=2, cp=4,
  cp=2 x dp=2, cp=2 x tp=2 (+SP), cp=2 x dp=2 ZeRO-1) whose first 5 losses, grad norms, eval loss and
  final weights match one process (computed in the same job by rank 0). The ranks run the attention's
  plain-PyTorch path (TRITON_INTERPRET unset), the kernels being covered by the test above.
- Through the training app: a cp=2 run checkpoints, and resumes on cp=1 with the same losses.

The comm timer's share of the step time of every gloo layout is printed (pytest -s shows it) and
written to $SPARSETRON_CP_RESULTS when set (benchmarks/results/context_parallel_gloo.json).

    python -m sparsetron.tests.test_context_parallel OUT.pt LAYOUTS_JSON   (under torchrun: a worker)
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

STEPS = 5
BASE = ["train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2", "model.n_layers=2"]
KINDS = {  # blocks of 16 tokens: cp=4 cuts a 128-token sequence into 8 chunks of one block
    "dense": ["attention=dense"],
    "nsa": ["attention=nsa", "attention.block_size=16", "attention.select_block=16", "attention.compress_block=8",
            "attention.compress_stride=4", "attention.num_selected=3", "attention.window=24"],
    "moba": ["attention=moba", "attention.moba_block=16", "attention.moba_top_k=2"],
    "sliding_window": ["attention=sliding_window", "attention.block_size=16", "attention.window=24"],
}
TWO_RANKS = {
    **{f"cp2-{k}": [*v, "parallel.cp=2"] for k, v in KINDS.items()},
    # the K/V gather inside the recomputed core (policy "attention"), and inside recomputed blocks
    "cp2-ckpt-attention-nsa": [*KINDS["nsa"], "parallel.cp=2", "model.activation_checkpointing=attention"],
    "cp2-ckpt-selective-dense": ["parallel.cp=2", "model.activation_checkpointing=selective"],
}
FOUR_RANKS = {
    **{f"cp4-{k}": [*v, "parallel.cp=4"] for k, v in KINDS.items()},
    **{f"cp2xdp2-{k}": [*v, "parallel.cp=2"] for k, v in KINDS.items()},
    "cp2xtp2-dense": ["parallel.cp=2", "parallel.tp=2"],
    "cp2xtp2-sp-dense": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp2xdp2-zero1-dense": ["parallel.cp=2", "parallel.zero_stage=1"],
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------ no processes
def test_zigzag_split_positions_and_balance():
    from sparsetron.parallel.context_parallel import merge_sequence, split_sequence, zigzag_positions

    x = torch.arange(2 * 24).view(2, 24)
    for cp in (1, 2, 3, 4):
        shards = [split_sequence(x, 1, cp, r) for r in range(cp)]
        assert torch.equal(merge_sequence(shards, 1), x)
        for r, shard in enumerate(shards):
            pos = zigzag_positions(24, cp, r)
            assert torch.equal(shard[0], pos) and torch.equal(shard[1], pos + 24)
        work = [int((zigzag_positions(24, cp, r) + 1).sum()) for r in range(cp)]  # causal keys per query
        c = 24 // (2 * cp)
        assert max(work) - min(work) <= c * c, work  # balanced up to the chunks' own triangles
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="train.seq_len"):
        split_sequence(x, 1, 5, 0)


CP_ILLEGAL = [  # (overrides, world size, field, words the message must contain)
    (["parallel.cp=2", "parallel.pp=2"], 4, "parallel.cp", "use cp=1 with pp"),
    (["parallel.cp=2", "parallel.zero_stage=2"], 2, "parallel.cp", "use zero_stage<=1"),
    (["parallel.cp=2", "parallel.zero_stage=1", "parallel.engine=deepspeed"], 2, "parallel.cp", "native engine"),
    (["parallel.cp=2", "parallel.zero_stage=3", "parallel.offload_param=cpu"], 2, "parallel.cp", "without offload"),
    (["parallel.cp=2", "model.mlp=moe"], 2, "parallel.cp", "use cp=1 for MoE"),
    (["parallel.cp=2", "sparsity.enabled=true"], 2, "parallel.cp", "N:M fine-tuning"),
    (["parallel.cp=4", "train.seq_len=100"], 4, "train.seq_len", "2*cp*1 = 8"),
    (["parallel.cp=2", *KINDS["nsa"], "train.seq_len=96"], 2, "train.seq_len", "2*cp*16 = 64"),
    (["parallel.cp=2", "attention=moba", "train.seq_len=192"], 2, "train.seq_len", "64-token attention blocks"),
    (["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "model.n_kv_heads=4", "train.seq_len=12"],
     8, "parallel.sequence_parallel", "6 tokens (train.seq_len / cp) must divide by tp=4"),
]


@pytest.mark.parametrize("overrides,world,field,words", CP_ILLEGAL)
def test_context_parallel_refusals_name_the_field(overrides, world, field, words):
    from sparsetron.configs.schema.validate import ConfigError, validate
    from sparsetron.tests.parallel_harness import compose_layout

    cfg = compose_layout([*BASE, *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert err.value.field == field, str(err.value)
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides,world", [(["parallel.cp=2", "parallel.zero_stage=1"], 4),
                                             (["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"], 4),
                                             (["parallel.cp=4", *KINDS["nsa"]], 4)])
def test_context_parallel_layouts_run_on_the_native_engine(overrides, world):
    from sparsetron.configs.schema.validate import validate
    from sparsetron.parallel.legality import resolve_engine
    from sparsetron.tests.parallel_harness import compose_layout

    cfg = compose_layout([*BASE, *overrides])
    validate(cfg, world_size=world)
    assert resolve_engine(cfg.parallel) == "native"


@pytest.mark.parametrize("tp,cp,dp,pp", [(2, 2, 2, 1), (1, 4, 2, 2), (2, 2, 1, 2)])
def test_dp_cp_group_matches_megatron_core(tp, cp, dp, pp):
    from megatron.core.parallel_state import RankGenerator

    from sparsetron.parallel.groups import layout_ranks

    ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    assert sorted(map(sorted, layout_ranks(tp, cp, dp, pp)["dp_cp"])) == sorted(map(sorted, ref.get_ranks("dp-cp")))


def test_planner_models_the_kv_all_gather_and_dkdv_reduce_scatter():
    """perf_model: per layer and micro-batch one K,V all-gather + one dK,dV reduce-scatter over cp
    (+ one gather where the core is recomputed), of the whole sequence's K,V; none without CP."""
    from sparsetron.parallel.perf_model import MODEL_PRESETS, Cluster, Layout, _Group, all_gather_time, predict

    model, cluster = MODEL_PRESETS["8b"], Cluster()
    base = dict(dp=2, micro_batch=1, global_batch=8, zero=1)
    assert predict(model, Layout(**base), cluster).breakdown["cp_comm"] == 0.0
    kv_bytes = 2 * 2 * model.seq_len * model.kv_dim  # bf16 K and V of one sequence
    for tp, cp, recompute, collectives in [(1, 2, "none", 2), (1, 4, "selective", 3), (2, 2, "full", 3)]:
        layout = Layout(tp=tp, cp=cp, recompute=recompute, **base)
        want = (layout.num_micro_batches * model.n_layers * collectives
                * all_gather_time(_Group(cp, tp), kv_bytes / tp, cluster))
        assert predict(model, layout, cluster).breakdown["cp_comm"] == pytest.approx(want)
    # the other ranks' K,V are kept for backward: activations grow with cp unless recomputed
    mem = {cp: predict(model, Layout(cp=cp, **base), cluster).memory["activations"] for cp in (2, 4)}
    assert mem[4] > mem[2] / 2


CHUNKED = {  # (module class path, attention config)
    "nsa": ("nsa.NSAAttention", dict(kind="nsa", block_size=16, window=24, compress_block=8, compress_stride=4,
                                      select_block=32, num_selected=3)),
    "moba": ("moba.MoBAAttention", dict(kind="moba", moba_block=16, moba_top_k=2)),
    "sliding_window": ("moba.SlidingWindowAttention", dict(kind="sliding_window", block_size=16, window=40)),
}


def _module(kind: str):
    import importlib

    from sparsetron.configs.schema.attention import AttentionConfig
    from sparsetron.configs.schema.model import ModelConfig

    model = ModelConfig(dim=128, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=64, ffn_dim=128, max_seq_len=256)
    if kind == "dense":
        from sparsetron.train.model.attention import SelfAttention

        return SelfAttention(model, None, 0)
    path, attn = CHUNKED[kind]
    mod, cls = path.split(".")
    return getattr(importlib.import_module(f"sparsetron.train.model.sparse_attention.{mod}"), cls)(
        model, AttentionConfig(**attn), 0)


def _inputs(kind: str, s: int, seed: int):
    """q, k, v (and NSA's gates) of a whole sequence, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    b, d = 2, 32
    t = [torch.randn(b, 4, s, d, generator=g), torch.randn(b, 2, s, d, generator=g),
         torch.randn(b, 2, s, d, generator=g)]
    if kind == "nsa":
        t.append(torch.rand(b, 4, s, 3, generator=g))
    return t, torch.randn(b, 4, s, d, generator=g)


def _core(module, kind: str):
    return module.attend_gated if kind == "nsa" else module.attend


@pytest.mark.parametrize("kind", list(CHUNKED))
def test_chunked_attend_on_the_kernels_matches_the_whole_sequence(kind):
    """Queries of positions [off, off + n) over the keys of [0, off + n) (key positions shifted for the
    Triton kernels): the whole sequence's output rows and every input gradient. Runs the Triton
    path here (the interpreter on CPU), which the gloo jobs leave to the reference."""
    from sparsetron.kernels._triton import triton_usable

    module = _module(kind)
    s, off, n = 96, 32, 32  # query block 1 of 3 (select block 32), keys of 64 positions
    inputs, grad = _inputs(kind, s, 1)
    assert triton_usable(inputs[0])
    full = [t.clone().requires_grad_() for t in inputs]
    out = _core(module, kind)(*full)
    (out[:, :, off:off + n] * grad[:, :, off:off + n]).sum().backward()
    q, k, v, *rest = [t.detach().clone() for t in inputs]
    part = [q[:, :, off:off + n], k[:, :, :off + n], v[:, :, :off + n], *(r[:, :, off:off + n] for r in rest)]
    part = [t.contiguous().requires_grad_() for t in part]
    out_part = _core(module, kind)(*part, q_offset=off)
    (out_part * grad[:, :, off:off + n]).sum().backward()
    assert rel(out_part, out[:, :, off:off + n]) < 1e-5
    assert rel(part[0].grad, full[0].grad[:, :, off:off + n]) < 1e-5
    assert rel(part[1].grad, full[1].grad[:, :, :off + n]) < 1e-5
    assert rel(part[2].grad, full[2].grad[:, :, :off + n]) < 1e-5
    if kind == "nsa":
        assert rel(part[3].grad, full[3].grad[:, :, off:off + n]) < 1e-5
    bad = off + 8  # off the block grid
    with pytest.raises(ValueError, match="q_offset=40 must be >= 0 and a multiple of"):
        _core(module, kind)(q[:, :, bad:bad + n], k[:, :, :bad + n], v[:, :, :bad + n],
                            *(r[:, :, bad:bad + n] for r in rest), q_offset=bad)


# --------------------------------------------------------------------------- the gloo worlds
def _attention_function_errors(world: int, rank: int) -> dict:
    """ContextParallel.attention at cp = world over the default group vs the unsplit attend: the
    largest relative error of any rank (output, dq, dk, dv, gates' grad) per kind."""
    import torch.distributed as dist

    from sparsetron.parallel.context_parallel import ContextParallel, split_sequence

    ctx = ContextParallel(None, world, rank)
    errors = {}
    for kind in ("dense", *CHUNKED):
        torch.manual_seed(0)
        module = _module(kind)
        s = 2 * world * 32  # chunks of 32: a multiple of every block above
        inputs, grad = _inputs(kind, s, 2)
        full = [t.clone().requires_grad_() for t in inputs]
        want = _core(module, kind)(*full)
        (want * grad).sum().backward()
        local = [split_sequence(t, 2, world, rank).requires_grad_() for t in inputs]
        out = ctx.attention(_core(module, kind), *local)
        (out * split_sequence(grad, 2, world, rank)).sum().backward()
        errs = [rel(out, split_sequence(want.detach(), 2, world, rank))]
        errs += [rel(t.grad, split_sequence(f.grad, 2, world, rank)) for t, f in zip(local, full)]
        worst = torch.tensor(max(errs))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        errors[kind] = worst.item()
    return errors


def _train(overrides, runtime, steps: int) -> dict:
    """`steps` steps of the tiny model on the harness's global batches, with the comm timer on."""
    from sparsetron.configs.schema.validate import validate
    from sparsetron.parallel import comm_timer
    from sparsetron.parallel.engine import build_engine
    from sparsetron.tests.parallel_harness import compose_layout, consolidated, rank_batches
    from sparsetron.train.model import Llama
    from sparsetron.train.optim import lr_at

    cfg = compose_layout([*BASE, *overrides])
    validate(cfg, runtime.world_size)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(Llama(cfg.model, cfg.attention, cfg.moe), cfg, runtime)
    timer = comm_timer.StepCommTimer(True)
    losses, norms, comm, step_s = [], [], {}, 0.0
    for step in range(steps):
        batches = rank_batches(cfg, step, engine.dp_rank, engine.dp_size)
        timer.reset()
        start = time.perf_counter()
        out = engine.train_step(batches, lr_at(step, cfg.optim, steps))
        step_s += time.perf_counter() - start
        for key, seconds in timer.record().items():  # comm_s, and comm_s.<collective>
            comm[key] = comm.get(key, 0.0) + seconds
        losses.append(out["loss"])
        norms.append(out["grad_norm"])
    x, y = rank_batches(cfg, steps, 0, 1)[0]
    return {"losses": losses, "grad_norms": norms, "eval": float(engine.eval_loss(x, y)),
            "state": consolidated(engine), "comm_fraction": comm["comm_s"] / step_s, "step_s": step_s / steps,
            "comm_fraction_by_op": {k.split(".", 1)[1]: v / step_s for k, v in comm.items() if "." in k},
            "layout": engine.layout_info()}


def worker(out_path: str, layouts: dict) -> int:
    from sparsetron.parallel import comm_timer
    from sparsetron.parallel.runtime import Runtime, init_runtime, shutdown

    runtime = init_runtime("cpu", "gloo", timeout_s=300)
    comm_timer.install(sync_cuda=False)
    results = {}
    try:
        results["attention"] = _attention_function_errors(runtime.world_size, runtime.rank)
        if runtime.is_main:  # one process, the same model and batches: what every layout must match
            for kind, overrides in KINDS.items():
                results[f"ref-{kind}"] = _train(overrides, Runtime(), STEPS)
        runtime.barrier()
        for name, overrides in layouts.items():
            results[name] = _train(overrides, runtime, STEPS)
            runtime.barrier()
        if runtime.is_main:
            torch.save(results, out_path + ".tmp")
            os.replace(out_path + ".tmp", out_path)
    finally:
        shutdown(runtime)
    return 0


def _run_world(tmp_path, nproc: int, layouts: dict) -> dict:
    out = tmp_path / f"cp{nproc}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "sparsetron.tests.test_context_parallel", str(out), json.dumps(layouts)]
    # the ranks take the attention's PyTorch path (the interpreter would take minutes on 2 cores)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


def _kind_of(name: str) -> str:
    return next(k for k in KINDS if name.endswith(k))


def _check_layouts(results: dict, layouts: dict) -> None:
    for kind, err in results["attention"].items():
        assert err < 1e-5, (kind, results["attention"])
    for name in layouts:
        got, ref = results[name], results[f"ref-{_kind_of(name)}"]
        assert got["layout"]["cp"] in (2, 4), (name, got["layout"])
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (name, got["losses"], ref["losses"])
        for a, b in zip(got["grad_norms"], ref["grad_norms"]):
            assert abs(a - b) <= 1e-4 * abs(b), (name, got["grad_norms"], ref["grad_norms"])
        assert abs(got["eval"] - ref["eval"]) <= 1e-5 * abs(ref["eval"]), (name, got["eval"], ref["eval"])
        assert got["state"].keys() == ref["state"].keys(), name
        for key, want in ref["state"].items():  # Adam moves every weight by ~lr = 3e-3 a step
            assert (got["state"][key] - want).abs().max().item() <= 5e-5, (name, key)
    for kind in KINDS:  # the models learn: the comparisons are not vacuous
        assert results[f"ref-{kind}"]["losses"][-1] < results[f"ref-{kind}"]["losses"][0], kind


def _record_comm(results: dict, layouts: dict) -> None:
    rows = {name: {"comm_fraction": round(results[name]["comm_fraction"], 4), "step_s": round(results[name]["step_s"], 5),
                   "comm_fraction_by_op": {k: round(v, 4) for k, v in results[name]["comm_fraction_by_op"].items()},
                   "layout": {k: results[name]["layout"][k] for k in ("tp", "cp", "dp", "zero_stage")}}
            for name in layouts}
    for name, row in rows.items():
        ops = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(row["comm_fraction_by_op"].items()))
        print(f"context parallel gloo {name:24s} comm {100 * row['comm_fraction']:5.1f}% of {row['step_s'] * 1e3:7.1f} "
              f"ms/step ({ops})")
    path = os.environ.get("SPARSETRON_CP_RESULTS")
    if path:
        old = json.load(open(path)) if os.path.exists(path) else {}
        old.setdefault("layouts", {}).update(rows)
        old["note"] = ("CPU, gloo, 2 shared CPU cores for 2-4 ranks, fp32, tiny model (dim 64, 2 layers, seq 128, "
                       "global batch 8 in micro-batches of 2); comm_fraction = comm timer seconds (time blocked in "
                       "collectives, waiting for peers included) / step seconds on rank 0 over 5 steps; by op: "
                       "all_gather_into_tensor = K/V gather, reduce_scatter_tensor = dK/dV, all_reduce = gradients, "
                       "loss/token counts and the finite check (tests/test_context_parallel.py)")
        old["torch"] = torch.__version__
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)


def test_two_rank_context_parallel(tmp_path):
    results = _run_world(tmp_path, 2, TWO_RANKS)
    _check_layouts(results, TWO_RANKS)
    _record_comm(results, TWO_RANKS)


def test_four_rank_context_parallel(tmp_path):
    results = _run_world(tmp_path, 4, FOUR_RANKS)
    _check_layouts(results, FOUR_RANKS)
    _record_comm(results, FOUR_RANKS)


# -------------------------------------------------------------------- through the training app
def test_cp2_checkpoint_resumes_on_one_process(tmp_path):
    """The trainer at cp=2 (sampler, loader, eval, checkpoint, comm timer), then a resume of its
    step-2 checkpoint on one process: steps 3 and 4 give the cp=2 run's losses."""
    from sparsetron.tests.helpers import TINY, run_cli
    from sparsetron.train.metrics import read_metrics

    common = [*TINY, "train.max_steps=4", "train.eval_every=2", "checkpoint.every=2"]
    run = tmp_path / "cp2"
    run_cli([*common, f"run_dir={run}", "parallel.cp=2"], nproc=2, env={"SPARSETRON_COMM_TIMER": "1"})
    cp2 = read_metrics(str(run))
    assert all(cp2["train"][s]["comm_s"] > 0 for s in cp2["train"])
    step2 = run / "checkpoints" / "step_00000002"
    layout = json.loads((step2 / "layout.json").read_text())
    assert layout["cp"] == 2 and (step2 / "model.safetensors").exists()

    one = tmp_path / "one"
    out = run_cli([*common, f"run_dir={one}", f"resume={step2}"])
    assert "resumed at step 2" in out.stdout
    resumed = read_metrics(str(one))
    for s in (3, 4):
        a, b = resumed["train"][s]["loss"], cp2["train"][s]["loss"]
        assert abs(a - b) <= 1e-5 * b, (s, a, b)
    assert abs(resumed["val"][4]["loss"] - cp2["val"][4]["loss"]) <= 1e-5 * cp2["val"][4]["loss"]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], json.loads(sys.argv[2])))
