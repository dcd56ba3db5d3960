"""Analytic performance model: hand-computed cases (CPU, pure arithmetic, a few seconds)."""

import dataclasses
import json
import math

import pytest

from sparsetron.parallel.perf_model import (
    MODEL_PRESETS,
    Cluster,
    Layout,
    Measurement,
    ModelSpec,
    _Group,
    activation_bytes_per_layer,
    all_gather_time,
    all_reduce_time,
    calibrate,
    layout_problems,
    main,
    memory_breakdown,
    parse_gpu_counts,
    pipeline_bubble_fraction,
    predict,
    rank_layouts,
    recommend,
    ring_all_gather_bytes,
    ring_all_reduce_bytes,
    zero_model_state_bytes,
)

H100 = Cluster()
# GPT as in Korthikanti et al.: MHA, 4h GeLU MLP, dropout, materialised attention scores.
GPT = ModelSpec("gpt", n_layers=8, hidden=1024, n_heads=16, n_kv_heads=16, ffn=4096, vocab=32000,
                seq_len=2048, gated_mlp=False, flash_attention=False, dropout=True)
SMALL = ModelSpec("small", n_layers=16, hidden=2048, n_heads=16, n_kv_heads=16, ffn=5632,
                  vocab=32000, seq_len=4096)


def test_bubble_fraction_formula():
    assert pipeline_bubble_fraction(4, 1, 8) == pytest.approx(3 / 8)
    assert pipeline_bubble_fraction(8, 2, 16) == pytest.approx(7 / 32)
    assert pipeline_bubble_fraction(1, 1, 5) == 0.0


def test_predicted_bubble_matches_formula():
    layout = Layout(tp=2, pp=4, vpp=2, dp=2, micro_batch=1, global_batch=16)  # m = 8
    pred = predict(SMALL, layout, H100)
    b = pred.breakdown
    per_step_work = sum(b[k] for k in ("compute", "recompute", "tp_comm", "ep_comm", "cp_comm", "pp_p2p"))
    assert b["pp_bubble"] == pytest.approx(per_step_work * 3 / (2 * 8))
    assert pred.bubble_fraction == pytest.approx(3 / 16)
    assert sum(b.values()) == pytest.approx(pred.step_time_s)


def test_ring_bytes_and_times():
    assert ring_all_reduce_bytes(8, 1e9) == pytest.approx(1.75e9)
    assert ring_all_gather_bytes(8, 1e9) == pytest.approx(0.875e9)
    assert ring_all_reduce_bytes(1, 1e9) == 0.0
    # Inside a node: half the 900 GB/s bidirectional NVLink spec, x comm efficiency 0.8.
    t = all_reduce_time(_Group(8, 1), 1e9, H100)
    assert t == pytest.approx(1.75e9 / (450e9 * 0.8) + 14 * 5e-6)
    # 16 ranks, one per node (stride 8, e.g. DP with tp=8): one 50 GB/s NIC per member.
    t = all_reduce_time(_Group(16, 8), 1e9, H100)
    assert t == pytest.approx(2 * 15 / 16 * 1e9 / (50e9 * 0.8) + 30 * 15e-6)
    # 16 ranks, 8 per node: the 8 NICs of a node work in parallel (8 x 50 = 400 GB/s).
    t = all_gather_time(_Group(16, 1), 1e9, H100, count=3)
    assert t == pytest.approx(15 / 16 * 1e9 / (400e9 * 0.8) + 3 * 15 * 15e-6)


def test_zero_memory_matches_zero_paper():
    # Rajbhandari et al. 2020, Fig. 1: Psi = 7.5B, N_d = 64, K = 12.
    gb = {z: sum(zero_model_state_bytes(7.5e9, 64, z).values()) / 1e9 for z in range(4)}
    assert gb[0] == pytest.approx(120.0)
    assert gb[1] == pytest.approx(31.40625)
    assert gb[2] == pytest.approx(16.640625)
    assert gb[3] == pytest.approx(1.875)
    z2 = zero_model_state_bytes(1e9, 8, 2)
    assert z2 == {"params": 2e9, "grads": 0.25e9, "optimizer": 1.5e9}


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_activation_memory_matches_korthikanti(tp):
    s, b, h, a = GPT.seq_len, 2, GPT.hidden, GPT.n_heads
    sbh = s * b * h
    f = lambda sp, rc: activation_bytes_per_layer(GPT, 0, b, s, tp, sp, rc)  # noqa: E731
    # Table 2 of Korthikanti et al. 2022.
    assert f(False, "none") == pytest.approx(sbh * (10 + 24 / tp + 5 * a * s / (h * tp)))
    assert f(True, "none") == pytest.approx(sbh / tp * (34 + 5 * a * s / h))
    assert f(True, "selective") == pytest.approx(sbh / tp * 34)
    assert f(True, "full") == pytest.approx(2 * sbh / tp)


def test_pipeline_rank0_holds_a_full_models_activations():
    # 1F1B: rank 0 keeps p micro-batches of L/p layers = L layers; interleaved adds (p-1)/(p v).
    per_layer = activation_bytes_per_layer(SMALL, 0, 1, SMALL.seq_len, 1, True, "none")
    for vpp, factor in [(1, 1.0), (2, 1 + 3 / 8)]:
        layout = Layout(pp=4, vpp=vpp, dp=1, global_batch=8)
        mem = memory_breakdown(SMALL, layout, H100)
        assert mem["pipeline_rank"] == 0
        assert mem["activations"] == pytest.approx(SMALL.n_layers * per_layer * factor)


def test_presets_parameter_counts():
    assert MODEL_PRESETS["8b"].total_params() == pytest.approx(8.03e9, rel=2e-3)  # Llama-3-8B
    assert MODEL_PRESETS["70b"].total_params() == pytest.approx(70.55e9, rel=2e-3)  # Llama-3-70B
    moe = MODEL_PRESETS["moe64"]
    assert moe.total_params() == pytest.approx(16.4e9, rel=0.02)  # DeepSeekMoE-16B
    assert moe.active_params() == pytest.approx(2.8e9, rel=0.03)


def test_single_gpu_time_is_compute_over_efficiency():
    layout = Layout(global_batch=4, micro_batch=2, zero=0)
    pred = predict(SMALL, layout, H100)
    tokens = 4 * SMALL.seq_len
    expect_compute = SMALL.model_flops_per_token() * tokens / (989e12 * 0.6)
    assert pred.breakdown["compute"] == pytest.approx(expect_compute)
    others = {k: v for k, v in pred.breakdown.items() if k not in ("compute", "optimizer")}
    assert all(v == 0 for v in others.values()), others
    assert pred.mfu == pytest.approx(0.6 * expect_compute / pred.step_time_s)


def test_optimizer_offload_moves_states_to_host_and_pays_pcie():
    base = Layout(dp=4, global_batch=8, zero=1)
    off = dataclasses.replace(base, offload="optimizer")
    p_base, p_off = predict(SMALL, base, H100), predict(SMALL, off, H100)
    assert p_off.memory["optimizer"] == 0.0
    assert p_off.memory["host_optimizer"] == pytest.approx(p_base.memory["optimizer"])
    shard = SMALL.total_params() / 4  # ZeRO-1 shard of one GPU
    assert p_off.breakdown["offload_pcie"] == pytest.approx(shard * (2 + 2) / 50e9)
    assert p_off.breakdown["optimizer"] == pytest.approx(shard / 1e9)  # CPU Adam, 1 Gparam/s
    assert p_off.step_time_s > p_base.step_time_s


def test_dp_comm_hand_computed():
    # ZeRO-1 without overlap: reduce-scatter bf16 grads + all-gather bf16 params, 8 GPUs in a node,
    # one collective per 40M-parameter bucket.
    layout = Layout(dp=8, global_batch=8, zero=1, overlap_dp=False)
    pred = predict(SMALL, layout, H100)
    params = SMALL.total_params()
    buckets = math.ceil(params / 40e6)
    one = 7 / 8 * 2 * params / (450e9 * 0.8) + buckets * 7 * 5e-6
    assert pred.breakdown["dp_comm"] == pytest.approx(2 * one)
    assert pred.dp_comm_total_s == pytest.approx(2 * one)
    # With overlap the gradient part hides behind the last micro-batch's backward.
    overlapped = predict(SMALL, dataclasses.replace(layout, overlap_dp=True), H100)
    assert overlapped.breakdown["dp_comm"] < pred.breakdown["dp_comm"]


def test_tp_comm_hand_computed():
    layout = Layout(tp=4, global_batch=2)  # 16 layers x 4 all-reduces (2 fwd, 2 bwd)
    pred = predict(SMALL, layout, H100)
    nbytes = 2 * 1 * SMALL.seq_len * SMALL.hidden
    per = 2 * 3 / 4 * nbytes / (450e9 * 0.8) + 2 * 3 * 5e-6
    assert pred.breakdown["tp_comm"] == pytest.approx(2 * 16 * 4 * per)


def test_illegal_layouts_name_the_field():
    problems = layout_problems(MODEL_PRESETS["8b"], Layout(tp=3, global_batch=8))
    assert any("tp=3" in p for p in problems)
    with pytest.raises(ValueError, match="vpp"):
        predict(SMALL, Layout(pp=2, vpp=2, global_batch=3))
    with pytest.raises(ValueError, match="ep"):
        predict(SMALL, Layout(ep=2, dp=2, global_batch=2))
    with pytest.raises(ValueError, match="zero"):
        predict(SMALL, Layout(pp=2, zero=3, global_batch=4))
    with pytest.raises(ValueError, match="hidden"):
        ModelSpec("bad", 2, 100, 3, 3, 10, 10, 10)
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpu_counts("8..x")
    assert parse_gpu_counts("8..64") == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="compute_efficiency"):
        Cluster(compute_efficiency=1.5)


def test_recommend_returns_legal_fitting_layout():
    best = recommend(MODEL_PRESETS["8b"], 16, H100, global_batch=64)
    assert best.layout.n_gpus == 16
    assert layout_problems(MODEL_PRESETS["8b"], best.layout) == []
    assert best.fits and best.memory_gb <= H100.hbm_gb
    ranked = rank_layouts(MODEL_PRESETS["8b"], 16, H100, 64)
    assert all(best.step_time_s <= p.step_time_s for p in ranked)
    with pytest.raises(ValueError, match="no legal layout"):
        recommend(MODEL_PRESETS["70b"], 1, H100, global_batch=8)


def test_recommend_keeps_tp_inside_a_node():
    # 64 KV heads make tp=16 legal; memory forces model parallelism (no CP, no ZeRO-3).
    big = ModelSpec("big", n_layers=32, hidden=8192, n_heads=64, n_kv_heads=64, ffn=28672,
                    vocab=32000, seq_len=4096)
    search = dict(zero_stages=(1,), max_cp=1, vpps=(1,), micro_batches=(1,))
    ranked = rank_layouts(big, 32, H100, 32, **search)
    assert ranked[0].layout.tp <= H100.gpus_per_node
    tp16 = [p for p in ranked if p.layout.tp == 16]
    assert tp16, "a tp=16 layout should be legal and fit"
    # The same layout with TP across nodes (tp16 pp1) is slower than tp8 pp2.
    t8 = predict(big, Layout(tp=8, pp=2, dp=2, global_batch=32, recompute="selective"), H100)
    t16 = predict(big, Layout(tp=16, pp=1, dp=2, global_batch=32, recompute="selective"), H100)
    assert t16.breakdown["tp_comm"] > 2 * t8.breakdown["tp_comm"]


def _synthetic_measurements(cluster):
    layouts = [
        Layout(dp=8, global_batch=16, zero=3, overlap_dp=False),
        Layout(tp=8, dp=4, global_batch=16, zero=1),
        Layout(tp=16, dp=1, global_batch=4, zero=1),
        Layout(tp=2, pp=2, dp=4, global_batch=16, zero=1, recompute="full"),
    ]
    return [Measurement(SMALL, lay, predict(SMALL, lay, cluster).step_time_s, lay.short()) for lay in layouts]


def test_calibrate_recovers_efficiencies():
    truth = dataclasses.replace(H100, compute_efficiency=0.43, comm_efficiency=0.55)
    result = calibrate(_synthetic_measurements(truth), H100)
    assert result["fitted"]["compute_efficiency"] == pytest.approx(0.43, rel=1e-4)
    assert result["fitted"]["comm_efficiency"] == pytest.approx(0.55, rel=1e-4)
    assert result["rms_rel_error"] < 1e-6
    assert all(abs(r["predicted_before_s"] / r["measured_s"] - 1) > 0.05 for r in result["rows"])


def test_calibrate_single_measurement_fits_compute_only():
    m = _synthetic_measurements(dataclasses.replace(H100, compute_efficiency=0.37))[1]
    result = calibrate([m], H100)
    assert set(result["fitted"]) == {"compute_efficiency"}
    assert result["rows"][0]["rel_error"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="fit"):
        calibrate([m], H100, fit=("bandwidth",))


def test_cli_writes_modelled_json(tmp_path, capsys):
    out = tmp_path / "scaling_model.json"
    assert main(["--model", "moe64", "--gpus", "8,16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "modelled" and "NOT MEASURED" in report["warning"]
    rows = report["models"]["moe64"]["rows"]
    assert [r["n_gpus"] for r in rows] == [8, 16]
    assert all(r["fits"] and r["memory_gb"] <= 80 for r in rows)
    assert math.isclose(rows[0]["scaling_efficiency"], 1.0)
    assert "MODELLED" in capsys.readouterr().out


def test_collect_turns_a_run_dir_into_a_calibration_measurement(tmp_path):
    import importlib.util

    from omegaconf import OmegaConf

    from sparsetron.parallel.perf_model import load_measurements

    spec = importlib.util.spec_from_file_location(
        "collect", __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks/scaling/collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)

    run = tmp_path / "run8"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({
        "model": {"name": "125m", "n_layers": 12, "dim": 768, "n_heads": 12, "n_kv_heads": 12,
                  "ffn_dim": 2048, "vocab_size": 32000, "tie_embeddings": True, "mlp": "swiglu",
                  "activation_checkpointing": "attention"},
        "train": {"seq_len": 1024, "micro_batch_size": 4, "global_batch_size": 64},
        "parallel": {"tp": 2, "pp": 1, "cp": 1, "ep": 1, "dp": -1, "zero_stage": 1},
        "checkpoint": {"dir": "checkpoints"}}), run / "config.yaml")
    times = [9.0, 9.0, 9.0, 0.50, 0.52, 0.48, 0.51]  # first 3 steps are warm-up
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": i + 1, "step_time_s": t}) + "\n" for i, t in enumerate(times))
        + json.dumps({"kind": "val", "step": 7, "loss": 3.0}) + "\n")
    with pytest.raises(ValueError, match="world-size"):
        collect.measurement_from_run(str(run))
    item = collect.measurement_from_run(str(run), world_size=8)
    assert item["step_time_s"] == pytest.approx(0.505)
    assert item["layout"] == {"tp": 2, "pp": 1, "cp": 1, "ep": 1, "dp": 4, "micro_batch": 4,
                              "global_batch": 64, "zero": 1, "recompute": "selective", "vpp": 1,
                              "sequence_parallel": False}
    # interleaved pipeline runs carry their virtual stages (else the model would predict them as 1F1B)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.parallel.update({"tp": 1, "pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2})
    OmegaConf.save(cfg, run / "config.yaml")
    assert collect.measurement_from_run(str(run), world_size=8)["layout"]["vpp"] == 2
    cfg.parallel.pp_schedule = "1f1b"
    OmegaConf.save(cfg, run / "config.yaml")
    assert collect.measurement_from_run(str(run), world_size=8)["layout"]["vpp"] == 1
    path = tmp_path / "m.json"
    path.write_text(json.dumps([item]))
    [m] = load_measurements(str(path))
    assert m.model.hidden == 768 and m.layout.num_micro_batches == 4
    assert calibrate([m], H100)["rows"][0]["rel_error"] == pytest.approx(0.0, abs=1e-6)
