"""Turn finished training runs into perf-model calibration measurements.

    python benchmarks/scaling/collect.py runs/a runs/b --world-size 8 -o measurements.json
    python -m sparsetron.parallel.perf_model --calibrate measurements.json --model 8b --gpus 8..1024

Each run directory must hold the trainer's ``config.yaml`` and ``metrics.jsonl``. The
measurement is the median ``step_time_s`` of the logged train steps after ``--warmup``
(compilation and allocator warm-up are not steady state). Sparse attention variants are
modelled as dense flash attention.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional

RECOMPUTE = {"none": "none", "attention": "selective", "full": "full"}


def _load_yaml(path: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _world_size_from_checkpoints(run_dir: str, ckpt_dir: str) -> Optional[int]:
    root = os.path.join(run_dir, ckpt_dir)
    if not os.path.isdir(root):
        return None
    for name in sorted(os.listdir(root), reverse=True):
        state = os.path.join(root, name, "trainer_state.json")
        if os.path.isfile(state):
            with open(state) as f:
                return int(json.load(f).get("world_size", 0)) or None
    return None


def _virtual_stages(p: dict) -> int:
    """Model chunks per pipeline rank, as parallel/pipeline.py places them."""
    if p.get("pp", 1) <= 1:
        return 1
    schedule = p.get("pp_schedule", "1f1b")
    if schedule == "zbv":
        return 2
    return int(p.get("pp_virtual_stages", 1)) if schedule in ("interleaved_1f1b", "zero_bubble") else 1


def measurement_from_run(run_dir: str, world_size: Optional[int] = None, warmup: int = 3) -> dict:
    """One calibration entry ({"model", "layout", "step_time_s", "label"}) for a run directory."""
    cfg_path, metrics_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "metrics.jsonl")
    for path in (cfg_path, metrics_path):
        if not os.path.isfile(path):
            raise ValueError(f"run_dir {run_dir!r} has no {os.path.basename(path)}")
    cfg = _load_yaml(cfg_path)
    m, t, p = cfg["model"], cfg["train"], cfg["parallel"]
    times = []
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("step", 0) > warmup and "step_time_s" in rec:
                times.append(float(rec["step_time_s"]))
    if not times:
        raise ValueError(f"{metrics_path}: no train steps after warmup={warmup}")

    model = {"name": m.get("name", "run"), "n_layers": m["n_layers"], "hidden": m["dim"],
             "n_heads": m["n_heads"], "n_kv_heads": m["n_kv_heads"], "ffn": m["ffn_dim"],
             "vocab": m["vocab_size"], "seq_len": t["seq_len"],
             "tie_embeddings": bool(m.get("tie_embeddings", False))}
    if m.get("mlp") == "moe":
        moe = cfg["moe"]
        model.update(num_experts=moe["num_experts"], top_k=moe["top_k"], expert_ffn=moe["expert_ffn_dim"],
                     shared_expert_ffn=moe.get("shared_expert_ffn_dim", 0))
    dp = int(p.get("dp", -1))
    if dp < 1:
        world = world_size or _world_size_from_checkpoints(run_dir, cfg.get("checkpoint", {}).get("dir", "checkpoints"))
        if not world:
            raise ValueError(f"{run_dir}: parallel.dp=-1 and no checkpoint records the world size; pass --world-size")
        dp = world // (p["tp"] * p["pp"] * p["cp"])
    layout = {"tp": p["tp"], "pp": p["pp"], "cp": p["cp"], "ep": p.get("ep", 1), "dp": dp,
              "micro_batch": t["micro_batch_size"], "global_batch": t["global_batch_size"],
              "zero": p.get("zero_stage", 0),
              "recompute": RECOMPUTE.get(m.get("activation_checkpointing", "none"), "none"),
              "vpp": _virtual_stages(p), "sequence_parallel": bool(p.get("sequence_parallel", False))}
    return {"model": model, "layout": layout, "step_time_s": statistics.median(times),
            "label": os.path.basename(os.path.normpath(run_dir)), "steps_used": len(times)}


def _median(values):
    return statistics.median(values) if values else None


def run_metrics(run_dir: str, warmup: int = 3) -> dict:
    """Steady-state numbers of one run (the scaling harness): medians over the train steps after
    ``warmup`` of step_time_s, tokens_per_s, mfu (GPU runs) and comm_s (SPARSETRON_COMM_TIMER=1
    runs; comm_s_by_op splits it per collective); every step's loss; the peak of mem_gib over all steps (a high-water mark: CUDA max allocated / host max RSS);
    None for a field no record carries."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise ValueError(f"run_dir {run_dir!r} has no metrics.jsonl")
    steady, mem, losses = [], [], []
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") != "train":
                continue
            if "loss" in rec:
                losses.append([int(rec.get("step", len(losses) + 1)), float(rec["loss"])])
            if "mem_gib" in rec:
                mem.append(float(rec["mem_gib"]))
            if rec.get("step", 0) > warmup and "step_time_s" in rec:
                steady.append(rec)
    if not steady:
        raise ValueError(f"{metrics_path}: no train steps after warmup={warmup}")

    def col(key):
        return [float(r[key]) for r in steady if key in r]

    comm = col("comm_s")
    return {
        "steps_used": len(steady),
        "step_time_s": _median(col("step_time_s")),
        "tokens_per_s": _median(col("tokens_per_s")),
        "mfu": _median(col("mfu")),
        "peak_mem_gib": max(mem) if mem else None,
        "comm_s": _median(comm),
        "comm_fraction": _median([r["comm_s"] / r["step_time_s"] for r in steady if "comm_s" in r]) if comm else None,
        "final_loss": float(steady[-1]["loss"]) if "loss" in steady[-1] else None,
        "losses": losses,  # [step, loss] of every logged step, warm-up included (loss-match checks)
        "comm_s_by_op": {k[len("comm_s."):]: _median(col(k)) for k in sorted({k for r in steady for k in r
                                                                             if k.startswith("comm_s.")})},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--world-size", type=int, default=None, help="GPUs of the runs whose parallel.dp is -1")
    ap.add_argument("--warmup", type=int, default=3, help="logged steps to skip")
    ap.add_argument("-o", "--output", default="-", help="JSON file (default stdout)")
    args = ap.parse_args(argv)
    try:
        items = [measurement_from_run(d, args.world_size, args.warmup) for d in args.run_dirs]
    except (ValueError, KeyError) as e:
        ap.error(str(e))
    text = json.dumps(items, indent=1)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
