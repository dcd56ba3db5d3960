"""benchmarks/nm_sparse_recipe.py --dry-run end to end (CPU, tiny model): dense pre-training, the
three 2:4 fine-tunes through the CLI, the speed section (which on CPU must say that every layer fell
back to masked dense), and a JSON with every field the GPU run reports."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "nm_sparse_recipe.py")
FINETUNES = ("no_distill", "logit_kd", "squarehead")
SPEED = ("dense_model", "sparse_masked_dense", "sparse_packed", "squarehead_masked_dense", "squarehead_packed")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nm_recipe") / "nm_sparse.json"
    start = time.time()
    # a generous budget: the budget logic (unit-tested below) must not trim runs on a slow or loaded CI machine
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--budget-s", "400", "--out", str(out)],
                          capture_output=True, text=True, timeout=420, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, wall


@pytest.mark.slow
def test_dry_run_report_has_every_field(dry_run):
    report, stdout, wall = dry_run
    assert wall < 400, wall  # ~65 s on an idle 2-core CI machine
    for key in ("device", "torch", "triton", "python", "cuda", "cusparselt_available", "capability", "dry_run",
                "model", "train", "sparsity", "speed", "inference", "gemm", "recipe", "quality", "goals",
                "fallback_warnings", "packings_by_shape", "errors", "phases_s", "wall_s"):
        assert key in report, key
    assert report["dry_run"] is True and report["errors"] == {}
    assert report["sparsity"]["pattern"] == "2:4"
    assert stdout.rstrip().splitlines()[-1].startswith("goals:")  # the table prints last

    # quality: teacher, one-shot and the three fine-tunes, the same steps each, through the CLI
    rec, q = report["recipe"], report["quality"]
    assert "error" not in rec["pretrain"] and rec["pretrain"]["steps"] == report["train"]["pretrain_steps"]
    assert rec["dense_checkpoint"].endswith(f"step_{report['train']['pretrain_steps']:08d}")
    steps = rec["finetune_steps"]
    assert steps == report["train"]["finetune_steps_requested"] and rec["finetune_steps_note"] is None
    for name in FINETUNES:
        run = rec["finetunes"][name]
        assert "error" not in run and run["steps"] == steps and run["val_steps"] == [0, steps], name
    assert "final_kl" not in rec["finetunes"]["no_distill"]  # no distillation: no KD term logged
    assert rec["finetunes"]["logit_kd"]["final_squarehead"] == 0.0  # beta_squarehead=0: KD only
    assert rec["finetunes"]["squarehead"]["final_squarehead"] > 0.0

    teacher = q["teacher_dense"]["val_loss"]
    one_shot = q["one_shot_2to4"]["val_loss"]
    assert teacher == rec["pretrain"]["final_val_loss"]
    assert q["one_shot_2to4"]["spread"] < 1e-6  # all three start from the same one-shot 2:4 model
    assert set(q["one_shot_2to4"]["per_run"]) == set(FINETUNES)
    gap = one_shot - teacher
    assert q["gap_one_shot_minus_teacher"] == pytest.approx(gap)
    for name in ("teacher_dense", "one_shot_2to4", *FINETUNES):
        assert q[name]["ppl"] == pytest.approx(math.exp(q[name]["val_loss"])), name
    for name in FINETUNES:
        expected = (one_shot - q[name]["val_loss"]) / gap if gap > 0 else None
        assert q[name]["recovered_fraction"] == (pytest.approx(expected) if expected is not None else None), name
    # the dense control: the same fine-tune without 2:4, from the same teacher checkpoint
    control = rec["dense_continued"]
    assert "error" not in control and control["steps"] == steps and "final_kl" not in control
    fair_gap = one_shot - control["final_val_loss"]
    assert q["dense_continued"]["val_loss"] == control["final_val_loss"]
    assert q["gap_one_shot_minus_dense_continued"] == pytest.approx(fair_gap)
    for name in FINETUNES:
        expected = (one_shot - q[name]["val_loss"]) / fair_gap if fair_gap > 0 else None
        assert q[name]["recovered_vs_dense_continued"] == (pytest.approx(expected) if expected else None), name
    assert q["teacher_converged"] == (teacher - control["final_val_loss"] < 0.1 * max(gap, 1e-9))
    judged = (q["squarehead"]["recovered_fraction"] if q["teacher_converged"]
              else q["squarehead"]["recovered_vs_dense_continued"])
    assert report["goals"]["squarehead_recovered_fraction_judged"] == judged
    assert set(report["goals"]) == {"squarehead_recovers_ge_95pct", "squarehead_recovered_fraction_judged",
                                    "sparse_step_ge_1_15x_dense_step"}


@pytest.mark.slow
def test_dry_run_speed_section_reports_the_cpu_fallback_honestly(dry_run):
    report, stdout, _ = dry_run
    speed, inf = report["speed"], report["inference"]
    for name in SPEED:
        v = speed["variants"][name]
        assert "error" not in v and v["step_s"] > 0 and v["packings_per_step"] == 0, name
    # every 2:4 layer (q, k, v, o, gate, up, down per block) is listed, all fell back, with the reason
    n_layers = report["model"]["n_layers"]
    for section in (speed, inf):
        assert len(section["layers"]) == 7 * n_layers
        assert all(r["path"] == "masked dense (fallback)" and "cpu" in r["reason"] for r in section["layers"])
        assert section["layer_summary"]["packed"] == 0 and section["packed_path_used"] is False
        assert section["note"]
    assert speed["speedup_packed_vs_dense_model"] == pytest.approx(
        speed["variants"]["dense_model"]["step_s"] / speed["variants"]["sparse_packed"]["step_s"])
    assert report["goals"]["sparse_step_ge_1_15x_dense_step"] is None  # no packed path: no speed-up claimed
    assert report["packings_by_shape"] == {}
    assert any("cpu" in w for w in report["fallback_warnings"])
    assert "NOTE: no linear ran the packed 2:4 forward" in stdout
    # inference rows: packed (here masked dense) and masked dense give the same logits
    assert [r["batch"] for r in inf["rows"]] == [1, 2]
    for r in inf["rows"]:
        assert r["logits_rel_err_packed_vs_masked"] < 1e-6 and r["dense_ms"] > 0 and r["packed_ms"] > 0
    assert report["gemm"]["rows"] and report["gemm"]["rows"][0]["semi_structured"] is False


def test_finetune_steps_are_lowered_to_fit_the_budget_and_say_so():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("nm_sparse_recipe", SCRIPT)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = argparse.Namespace(finetune_steps=100, min_finetune_steps=10, margin_s=25.0)
    speed = {"variants": {"dense_model": {"step_s": 0.5}, "sparse_packed": {"step_s": 1.0},
                          "squarehead_packed": {"step_s": 1.5}}}  # 4.5 s per step of the four runs
    assert recipe.finetune_steps_that_fit(args, 1000.0, 20.0, speed) == (100, None)
    steps, note = recipe.finetune_steps_that_fit(args, 250.0, 20.0, speed)  # (250 - 25 - 80) / 4.5 = 32
    assert steps == 32 and note.startswith("lowered from 100")
    steps, note = recipe.finetune_steps_that_fit(args, 50.0, 20.0, speed)  # nothing fits: the minimum, said so
    assert steps == 10 and note.startswith("lowered from 100")
    args.finetune_steps = 10
    steps, note = recipe.finetune_steps_that_fit(args, 50.0, 20.0, speed)
    assert steps == 10 and note.startswith("kept at the minimum 10")
    assert recipe.finetune_steps_that_fit(args, 50.0, 20.0, {})[1].startswith("no step time measured")


def test_scale_picks_its_defaults_and_gpu_scale_refuses_without_a_gpu(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nm_sparse_recipe", SCRIPT)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cpu = recipe.parse_args(["--scale", "cpu"])
    assert (cpu.pretrain_steps, cpu.finetune_steps, cpu.budget_s, cpu.skip_speed) == (2000, 400, 6000.0, True)
    assert recipe.model_overrides(cpu) == recipe.CPU_SCALE
    assert "optim.lr=3e-3" in recipe.pretrain_overrides(cpu)
    dry = recipe.parse_args(["--dry-run", "--finetune-steps", "7"])
    assert dry.scale == "dry" and dry.pretrain_steps == 150 and dry.min_finetune_steps == 7 and not dry.skip_speed
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            recipe.parse_args([])  # --scale gpu is the default
        assert "--scale gpu: no GPU here" in capsys.readouterr().err
