"""Calibrate the analytic perf model on the measured single-GPU runs (benchmarks/results/dense_speed.json)
and report predicted vs measured step time.

    python benchmarks/scaling/calibrate_single_gpu.py --out benchmarks/results/scaling_single_gpu.json

One GPU has no communication, so only the compute efficiency is fitted, on the compiled + fused variants
(the recommended setup); every measured sparsetron row is then predicted with it, so the table also shows
how far the eager variants sit below what the calibrated model expects."""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

from sparsetron.parallel.perf_model import Cluster, Layout, Measurement, ModelSpec, calibrate, predict  # noqa: E402

# datasheet figures; the name decides which
CLUSTERS = {
    "H200": Cluster(name="h200", peak_tflops=989.0, hbm_gb=141.0, hbm_gbps=4800.0, gpus_per_node=1),
    "H100": Cluster(name="h100", peak_tflops=989.0, hbm_gb=80.0, hbm_gbps=3350.0, gpus_per_node=1),
}
FIT_VARIANTS = ("compile+triton-loss",)


def measurements(report: dict):
    m = report["model"]
    rows = []
    for r in report["results"]:
        if r.get("impl") != "sparsetron" or not r.get("step_s") or not r.get("micro_batch"):
            continue
        spec = ModelSpec(name="1b", n_layers=m["n_layers"], hidden=m["dim"], n_heads=m["n_heads"],
                         n_kv_heads=m["n_kv_heads"], ffn=m["ffn_dim"], vocab=m["vocab_size"], seq_len=r["seq_len"],
                         tie_embeddings=m["tie_embeddings"])
        ac = r.get("activation_checkpointing", "none")
        layout = Layout(micro_batch=r["micro_batch"], global_batch=r["micro_batch"], zero=0,
                        recompute={"none": "none", "selective": "selective", "full": "full"}.get(ac, "none"))
        rows.append((r, Measurement(spec, layout, r["step_s"], label=f"{r['name']} seq{r['seq_len']}")))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--measured", default=os.path.join(REPO, "benchmarks", "results", "dense_speed.json"))
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "scaling_single_gpu.json"))
    args = ap.parse_args(argv)
    with open(args.measured) as f:
        report = json.load(f)
    device = report["device"]
    cluster = next((c for key, c in CLUSTERS.items() if key in device), None)
    if cluster is None:
        print(f"no cluster preset for device {device!r}", file=sys.stderr)
        return 2
    rows = measurements(report)
    fit_on = [m for r, m in rows if r.get("variant") in FIT_VARIANTS]
    fitted = calibrate(fit_on, cluster, fit=("compute_efficiency",))["cluster"]
    table = []
    for r, m in rows:
        pred = predict(m.model, m.layout, fitted).step_time_s
        table.append({"label": m.label, "micro_batch": m.layout.micro_batch, "measured_s": m.step_time_s,
                      "predicted_s": pred, "rel_error": pred / m.step_time_s - 1.0,
                      "used_for_fit": r.get("variant") in FIT_VARIANTS})
    out = {"kind": "calibration (measured single-GPU runs)", "device": device, "torch": report.get("torch"),
           "source": os.path.relpath(args.measured, REPO), "fit": ["compute_efficiency"],
           "fitted_compute_efficiency": fitted.compute_efficiency, "rows": table}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{device}: fitted compute efficiency {fitted.compute_efficiency:.3f} on {list(FIT_VARIANTS)}")
    print(f"{'run':42s} {'mb':>3s} {'measured s':>10s} {'predicted s':>11s} {'error':>7s}")
    for t in table:
        print(f"{t['label']:42s} {t['micro_batch']:3d} {t['measured_s']:10.3f} {t['predicted_s']:11.3f} "
              f"{t['rel_error']:+7.1%}{'  (fit)' if t['used_for_fit'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
