"""benchmarks/presets.py --smoke: the preset through the trainer API and the Hugging Face anchor run on
the CPU and land in one JSON whose accounting is consistent (no speed is asserted)."""

import json

import pytest

from sparsetron.benchmarks.presets import main


def test_smoke_run_writes_consistent_json(tmp_path):
    out = tmp_path / "presets.json"
    main(["--smoke", "--anchors", "llama", "--peak-tflops", "0.01", "--profile", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["smoke"] and report["versions"]["torch"] and report["commit"]
    assert report["peak_flops"] == pytest.approx(0.01e12)
    (res,) = report["results"]
    assert res["preset"] == "gpu_125m" and res["shapes"]["tokens_per_step"] == 8 * 64
    ours, anchor = res["runs"]
    assert ours["name"] == "sparsetron" and anchor["name"] == "hf-llama (eager)", anchor.get("error")
    # CPU: auto turned compile and the Triton kernels off; the anchor is the same architecture and shape
    assert ours["compile"] is False and ours["fused_kernels"] is False
    assert anchor["params"] == res["shapes"]["params"] and anchor["flops_per_token"] == ours["flops_per_token"]
    for r in (ours, anchor):
        assert r["steps"] == 3 and r["micro_batch"] * r["accumulation"] == 8 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 0.01e12)
    assert res["ratio_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / anchor["tokens_per_s"])
    # --profile: two more steps under SPARSETRON_PROFILE, not timed; the trace is kept next to the JSON
    assert ours["profile"]["steps"] == "3..4"
    assert ours["profile"]["files"]["rank0.trace.json.gz"] > 0 and "rank0.txt" in ours["profile"]["files"]
    assert (tmp_path / "presets_profile_gpu_125m" / "rank0.trace.json.gz").exists()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--smoke", "--anchors", "bert", "--out", str(tmp_path / "x.json")])
