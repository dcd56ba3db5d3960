"""benchmarks/loss_curves.py: the cpu-smoke preset end to end through the real CLI (one attention pair,
one MoE pair), failure isolation, the budget, --plot-only, argument errors, the GPU preset's configs,
and the attention-coverage numbers against the masks the sparse kernels actually use."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from sparsetron.benchmarks import loss_curves as lc

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "loss_curves.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_curves") / "lc.json"
    start = time.time()
    proc = run_script("--preset", "cpu-smoke", "--variants", "dense,sliding_window,no_rounding,token_rounding",
                      "--out", str(out))
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out, proc.stdout, wall


def test_smoke_report_has_curves_and_metadata(smoke):
    report, out, stdout, wall = smoke
    assert wall < 90, wall
    for key in ("device", "torch", "triton", "python", "git_commit", "preset", "steps", "eval_every", "groups",
                "summary", "wall_s"):
        assert key in report, key
    assert report["preset"] == "cpu-smoke" and report["steps"] == 6 and report["eval_every"] == 3
    assert set(report["groups"]) == {"attention", "moe"}
    assert list(report["groups"]["attention"]["variants"]) == ["dense", "sliding_window"]
    assert list(report["groups"]["moe"]["variants"]) == ["no_rounding", "token_rounding"]
    expected = {"dense": "attention=dense", "sliding_window": "attention=sliding_window",
                "no_rounding": "moe.token_rounding=false", "token_rounding": "moe.token_rounding=true"}
    for group, g in report["groups"].items():
        for name, v in g["variants"].items():
            assert v["status"] == "ok" and v["returncode"] == 0, (name, v.get("log_tail"))
            assert expected[name] in v["overrides"] and "train.max_steps=6" in v["overrides"]
            assert v["overrides"] == lc.variant_overrides("cpu-smoke", group, name, 6, 3, [])
            assert v["train"]["step"] == [1, 2, 3, 4, 5, 6]
            assert v["val"]["step"] == [0, 3, 6]
            losses = v["train"]["loss"] + v["val"]["loss"]
            assert all(math.isfinite(x) and 0 < x < 20 for x in losses), losses
            assert v["wall_s"] > 0 and v["tokens_per_s_median"] > 0 and v["train_s"] > 0
            assert v["resolved"]["train"]["max_steps"] == 6 and v["resolved"]["train"]["seed"] == 1234
    # the variant setting reached the trainer
    att = report["groups"]["attention"]["variants"]
    assert att["sliding_window"]["resolved"]["attention"]["kind"] == "sliding_window"
    assert att["sliding_window"]["resolved"]["attention"]["window"] == 16
    assert att["dense"]["coverage"]["pair_fraction"] == 1.0
    assert 0 < att["sliding_window"]["coverage"]["pair_fraction"] < 1
    assert report["groups"]["moe"]["variants"]["token_rounding"]["resolved"]["moe"]["token_rounding"] is True
    # PNGs next to the JSON, the table printed last
    for group in ("attention", "moe"):
        png = out.parent / f"lc_{group}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
    last = stdout.rstrip().splitlines()[-6:]
    assert [line.split()[1] for line in last[-4:]] == ["dense", "sliding_window", "no_rounding", "token_rounding"]


def test_summary_differences_equal_recorded_finals(smoke):
    report = smoke[0]
    for group, s in report["summary"].items():
        variants = report["groups"][group]["variants"]
        base = variants[s["baseline"]]["val"]["loss"][-1]
        assert s["baseline"] == lc.BASELINE[group] and s["final_step"] == 6
        for name, row in s["variants"].items():
            final = variants[name]["val"]["loss"][-1]
            assert row["final_val_loss"] == final
            assert row["diff_vs_baseline"] == pytest.approx(final - base, abs=1e-12)
        assert s["variants"][s["baseline"]]["diff_vs_baseline"] == 0.0


def test_moe_routing_metrics_show_rounding(smoke):
    moe = smoke[0]["groups"]["moe"]["variants"]
    plain, rounded = moe["no_rounding"]["routing"], moe["token_rounding"]["routing"]
    for r in (plain, rounded):
        assert r["layers"] == ["L0", "L1"] and r["tile_m"] == 16
        assert r["series"]["step"] == [1, 2, 3, 4, 5, 6]
        assert set(r["expert_load_by_step"]) == {"3", "6"}  # per-expert loads are logged at eval steps
        for by_layer in r["expert_load_by_step"].values():
            # last micro-batch: 4 x 64 tokens, top-2 (rounding keeps the total within tile_m / 2 per layer)
            assert all(len(loads) == 4 and abs(sum(loads) - 512) <= 8 for loads in by_layer.values())
    assert plain["tokens_dropped_per_step_mean"] == 0 and plain["tokens_added_per_step_mean"] == 0
    assert plain["experts_per_token_mean"] == 2.0
    assert rounded["tokens_dropped_per_step_mean"] + rounded["tokens_added_per_step_mean"] > 0
    assert rounded["expert_loads_tile_multiple_fraction"] == 1.0
    assert rounded["topk_assignments_per_micro_batch"] == 4 * 64 * 2 * 2  # micro-batch x seq x top-k x layers
    assert rounded["dropped_fraction"] == rounded["tokens_dropped_per_step_mean"] / 1024
    summary = smoke[0]["summary"]["moe"]["variants"]
    assert summary["token_rounding"]["added_fraction"] == rounded["added_fraction"]
    assert summary["no_rounding"]["dropped_fraction"] == 0.0
    assert plain["expert_loads_tile_multiple_fraction"] < 1.0


def test_plot_only_redraws(smoke, tmp_path):
    report, out = smoke[0], smoke[1]
    copy = tmp_path / "again.json"
    shutil.copy(out, copy)
    proc = run_script("--plot-only", str(copy), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for group in report["groups"]:
        assert (tmp_path / f"again_{group}.png").read_bytes()[:8] == PNG_MAGIC


def test_failed_variant_is_recorded_and_the_others_still_run(tmp_path):
    out = tmp_path / "fail.json"
    # block 24 is not a kernel block size: sliding_window fails building the model, dense ignores it
    proc = run_script("--preset", "cpu-smoke", "--group", "attention", "--variants", "dense,sliding_window,moba",
                      "--steps", "2", "--eval-every", "2", "--set", "attention.block_size=24", "--out", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    v = report["groups"]["attention"]["variants"]
    assert v["dense"]["status"] == "ok" and v["moba"]["status"] == "ok"  # moba reads moba_block, not block_size
    bad = v["sliding_window"]
    assert bad["status"] == "failed" and bad["returncode"] != 0 and "block_size" in bad["log_tail"]
    assert bad["train"]["step"] == [] and "attention.block_size=24" in bad["overrides"]
    s = report["summary"]["attention"]["variants"]
    assert s["sliding_window"]["final_val_loss"] is None and s["sliding_window"]["diff_vs_baseline"] is None
    assert s["moba"]["diff_vs_baseline"] == pytest.approx(v["moba"]["val"]["loss"][-1] - v["dense"]["val"]["loss"][-1])


def test_budget_skips_the_tail(tmp_path):
    out = tmp_path / "budget.json"
    proc = run_script("--preset", "cpu-smoke", "--group", "attention", "--variants", "dense,moba", "--steps", "1",
                      "--budget-s", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    v = report["groups"]["attention"]["variants"]
    assert v["dense"]["status"] == "ok" and v["moba"]["status"] == "skipped" and "budget" in v["moba"]["reason"]
    assert report["summary"]["attention"]["variants"]["moba"]["final_val_loss"] is None


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps: got 0, must be >= 1"),
    (["--steps", "4", "--eval-every", "5"], "--eval-every: got 5, must be in [1, --steps=4]"),
    (["--group", "mlp"], "--group: invalid choice: 'mlp'"),
    (["--preset", "tpu"], "--preset: invalid choice: 'tpu'"),
    (["--variants", "dense,flash"], "--variants: unknown variant 'flash' for --group all, allowed: dense, nsa, moba"),
    (["--group", "attention", "--variants", "nsa"], "--variants: group attention needs its baseline 'dense'"),
    (["--group", "moe", "--variants", "dense"], "--variants: unknown variant 'dense' for --group moe"),
    (["--set", "train.seed"], "--set: got 'train.seed', expected KEY=VALUE"),
    (["--variant-timeout", "0"], "--variant-timeout: got 0.0, must be > 0"),
    (["--plot-only", "/nonexistent/lc.json"], "--plot-only: '/nonexistent/lc.json' is not a file"),
])
def test_bad_arguments_give_one_clear_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        lc.parse_args(argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], errors


# ------------------------------------------------------------------------- GPU preset, no GPU
def test_gpu_preset_configs_compose_validate_and_sparsify():
    from sparsetron.configs.schema.validate import validate
    from sparsetron.train.cli import compose
    from sparsetron.train.metrics import parameter_counts

    for group in lc.GROUPS:
        for name in lc.variants_of("gpu", group):
            overrides = lc.variant_overrides("gpu", group, name, 300, 50, [])
            cfg = compose(overrides, run_dir="/tmp/unused")
            validate(cfg, 1)
            assert cfg.train.seq_len == 2048 and cfg.train.max_steps == 300 and cfg.train.precision == "bf16"
            assert cfg.train.global_batch_size == 16 and cfg.data.max_corpus_bytes == 0
            assert not cfg.checkpoint.save_final and cfg.logging.wandb.mode == "disabled"
            counts = parameter_counts(cfg.model, cfg.attention, cfg.moe)  # builds the modules: checks block sizes
            if group == "attention":
                assert cfg.model.mlp == "swiglu" and cfg.attention.kind == lc.ATTENTION["gpu"][name]["kind"]
                assert 30e6 <= counts["total"] <= 50e6, counts
                cover = lc.attention_coverage(lc.ATTENTION["gpu"][name], cfg.train.seq_len)
                if name == "dense":
                    assert cover["pair_fraction"] == 1.0
                    continue
                assert cover["pair_fraction"] < 0.4, (name, cover)  # the brief: clearly < 50 % of causal
                for branch in cover["branches"].values():
                    if isinstance(branch, dict):
                        assert branch["tile_fraction"] < 0.3, (name, branch)
            else:
                assert cfg.model.mlp == "moe" and cfg.moe.token_rounding == (name == "token_rounding")
                # ~4 M-tiles of tile_m per expert per micro-batch, so rounding changes the counts
                per_expert = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.moe.top_k / cfg.moe.num_experts
                assert 2 <= per_expert / cfg.moe.tile_m <= 8


# ------------------------------------------------- coverage numbers vs the kernels' own masks
def _causal(s):
    return s * (s + 1) // 2


@pytest.mark.parametrize("seq_len, block, window", [(200, 16, 40), (2048, 64, 256), (100, 32, 7)])
def test_sliding_window_coverage_matches_kernel_mask(seq_len, block, window):
    from sparsetron.kernels.sparse_attention.reference import block_lists_to_mask
    from sparsetron.kernels.sparse_attention.selection import window_block_lists

    idx, cnt = window_block_lists(seq_len, block, window)
    mask = block_lists_to_mask(idx, cnt, block, seq_len, seq_len, window=window)
    cover = lc.attention_coverage({"kind": "sliding_window", "window": window, "block_size": block}, seq_len)
    assert cover["pair_fraction"] == mask.sum().item() / _causal(seq_len)
    assert cover["branches"]["window"]["tiles"] == cnt.sum().item()


@pytest.mark.parametrize("seq_len, block, top_k", [(200, 16, 3), (2048, 64, 4), (90, 32, 1)])
def test_moba_coverage_matches_kernel_mask(seq_len, block, top_k):
    from sparsetron.kernels.sparse_attention.reference import block_lists_to_mask
    from sparsetron.kernels.sparse_attention.selection import moba_select

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, seq_len, 8, generator=g), torch.randn(1, 2, seq_len, 8, generator=g)
    idx, cnt = moba_select(q, k, block, top_k)
    mask = block_lists_to_mask(idx, cnt, block, seq_len, seq_len)
    cover = lc.attention_coverage({"kind": "moba", "moba_block": block, "moba_top_k": top_k}, seq_len)
    for h in range(2):
        assert cover["pair_fraction"] == mask[0, h].sum().item() / _causal(seq_len)
        assert cover["branches"]["blocks"]["tiles"] == cnt[0, h].sum().item()


@pytest.mark.parametrize("seq_len, sel_block, n_sel, window, cmp_block, stride",
                         [(200, 16, 3, 32, 16, 8), (2048, 64, 4, 256, 32, 16), (130, 32, 2, 20, 16, 16)])
def test_nsa_coverage_bounds_kernel_mask(seq_len, sel_block, n_sel, window, cmp_block, stride):
    from sparsetron.kernels.sparse_attention.reference import block_lists_to_mask
    from sparsetron.kernels.sparse_attention.selection import nsa_select, window_block_lists

    settings = {"kind": "nsa", "block_size": sel_block, "window": window, "compress_block": cmp_block,
                "compress_stride": stride, "select_block": sel_block, "num_selected": n_sel}
    cover = lc.attention_coverage(settings, seq_len)
    n_cmp = (seq_len - cmp_block) // stride + 1
    nqb = -(-seq_len // sel_block)
    w_idx, w_cnt = window_block_lists(seq_len, sel_block, window)
    w_mask = block_lists_to_mask(w_idx, w_cnt, sel_block, seq_len, seq_len, window=window)[0, 0]
    assert cover["branches"]["compressed_keys"] == n_cmp
    assert cover["branches"]["window"]["tiles"] == w_cnt.sum().item()
    for seed in range(3):  # random importances: the bound holds for whatever the router selects
        imp = torch.rand(1, 2, nqb, n_cmp, generator=torch.Generator().manual_seed(seed))
        idx, cnt = nsa_select(imp, seq_len, sel_block, stride, cmp_block, n_sel)
        assert cover["branches"]["selected"]["tiles"] == cnt[0, 0].sum().item() == cnt[0, 1].sum().item()
        for h in range(2):
            union = block_lists_to_mask(idx, cnt, sel_block, seq_len, seq_len)[0, h] | w_mask
            assert union.sum().item() / _causal(seq_len) <= cover["pair_fraction"] + 1e-12
