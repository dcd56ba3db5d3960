r"""Loss-curve comparison of a small model trained several ways (issues 4 and 5), through the real CLI.

    python benchmarks/loss_curves.py --preset gpu --group all --budget-s 420 --variant-timeout 150 \
        --out $OUT/loss_curves.json                                  # one H100/H200, ~5-6 min expected
    python benchmarks/loss_curves.py --preset cpu-smoke --out /tmp/lc.json                   # CPU, < 1 min
    python benchmarks/loss_curves.py --plot-only benchmarks/results/loss_curves.json         # re-draw PNGs

Groups (each variant is one `python -m sparsetron.train` subprocess; same seed, data, model, schedule):
  attention: dense (baseline) | nsa | moba | sliding_window  -- experiment=loss_curves_attention
  moe:       no_rounding (baseline) | token_rounding (moe.token_rounding=true, tile_m 128)
                                                             -- experiment=loss_curves_moe
Writes a JSON (versions, device, git commit, the exact overrides and resolved config of every variant,
per-step train loss, validation losses, wall time, tokens/s, MoE routing metrics, the share of causal
attention each sparse variant computes) with a summary (final validation loss and its difference to the
group's baseline), one PNG per group next to it (`<stem>_attention.png`, `<stem>_moe.png`; skipped with
a note when matplotlib is missing), and prints a table last. The JSON is rewritten after every variant,
so a run cut short keeps what finished. A failed or timed-out variant is recorded (status, log tail)
and the others still run.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("attention", "moe")
BASELINE = {"attention": "dense", "moe": "no_rounding"}

# Attention settings per variant and preset; overrides are generated from these, and so is the
# coverage report (attention_coverage), so the two cannot disagree.
ATTENTION = {
    # seq 2048: 32 blocks of 64. Every sparse variant computes < 50 % of the causal attention there:
    # NSA 4 selected blocks + 256-token window, MoBA own block + top 4 of 64, window 256.
    "gpu": {
        "dense": {"kind": "dense"},
        "nsa": {"kind": "nsa", "block_size": 64, "window": 256, "compress_block": 32, "compress_stride": 16,
                "select_block": 64, "num_selected": 4},
        "moba": {"kind": "moba", "moba_block": 64, "moba_top_k": 4},
        "sliding_window": {"kind": "sliding_window", "window": 256, "block_size": 64},
    },
    # seq 64: 4 blocks of 16, the smallest blocks the kernels allow
    "cpu-smoke": {
        "dense": {"kind": "dense"},
        "nsa": {"kind": "nsa", "block_size": 16, "window": 16, "compress_block": 16, "compress_stride": 8,
                "select_block": 16, "num_selected": 2},
        "moba": {"kind": "moba", "moba_block": 16, "moba_top_k": 1},
        "sliding_window": {"kind": "sliding_window", "window": 16, "block_size": 16},
    },
}
MOE_VARIANTS = {"no_rounding": ["moe.token_rounding=false"], "token_rounding": ["moe.token_rounding=true"]}

# The tiny model of tests/helpers.py (TINY), with a MoE of 4 experts x ffn 64, tile 16 for the moe group.
_TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.vocab_size=512", "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8",
         "train.micro_batch_size=4", "data.max_corpus_bytes=400000", "train.eval_batches=2",
         "optim.warmup_steps=2", "logging.wandb.mode=disabled", "logging.progress_bar=false", "logging.plot=false",
         "checkpoint.every=0", "checkpoint.save_final=false"]
PRESETS = {
    "gpu": {
        "steps": 300, "eval_every": 50, "variant_timeout_s": 180, "smooth": 0.9, "seq_len": 2048, "tile_m": 128,
        "base": {"attention": ["experiment=loss_curves_attention"], "moe": ["experiment=loss_curves_moe"]},
    },
    "cpu-smoke": {
        "steps": 6, "eval_every": 3, "variant_timeout_s": 300, "smooth": 0.0, "seq_len": 64, "tile_m": 16,
        "base": {"attention": list(_TINY),
                 "moe": [*_TINY, "model.mlp=moe", "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=64",
                         "moe.tile_m=16"]},
    },
}


# ------------------------------------------------------------------------------ configuration
def attention_overrides(settings: dict) -> list[str]:
    return [f"attention={settings['kind']}", *(f"attention.{k}={v}" for k, v in settings.items() if k != "kind")]


def variants_of(preset: str, group: str) -> dict[str, list[str]]:
    if group == "attention":
        return {name: attention_overrides(s) for name, s in ATTENTION[preset].items()}
    return dict(MOE_VARIANTS)


def variant_overrides(preset: str, group: str, variant: str, steps: int, eval_every: int,
                      extra: list[str]) -> list[str]:
    """Everything the CLI gets for one variant except run_dir (the variant's own directory)."""
    return [*PRESETS[preset]["base"][group], *variants_of(preset, group)[variant], f"name=lc_{group}_{variant}",
            f"train.max_steps={steps}", f"train.eval_every={eval_every}", *extra]


def attention_coverage(settings: dict, seq_len: int) -> dict:
    """Share of the causal (query, key) pairs a variant attends, per query token, summed over the
    sequence; NSA is an upper bound (its data-dependent selected blocks are assumed to lie outside the
    window) and its compressed branch (every past token at 1/stride resolution) is not counted. Also
    the tiles each branch computes over the causal tiles at that branch's block size."""
    kind = settings["kind"]
    causal = seq_len * (seq_len + 1) // 2

    def tiles(block: int, count_of) -> dict:
        n = -(-seq_len // block)
        computed = sum(count_of(i) for i in range(n))
        return {"block": block, "tiles": computed, "causal_tiles": n * (n + 1) // 2,
                "tile_fraction": computed / (n * (n + 1) // 2)}

    def window_tiles(block: int, window: int):
        return lambda i: i - max(i * block - window + 1, 0) // block + 1  # selection.window_block_lists

    if kind == "dense":
        return {"pair_fraction": 1.0, "exact": True, "branches": {}}
    if kind == "sliding_window":
        w = settings["window"]
        seen = sum(min(t + 1, w) for t in range(seq_len))
        return {"pair_fraction": seen / causal, "exact": True,
                "branches": {"window": tiles(settings["block_size"], window_tiles(settings["block_size"], w))}}
    if kind == "moba":
        b, k = settings["moba_block"], settings["moba_top_k"]
        seen = sum((t - (t // b) * b + 1) + min(k, t // b) * b for t in range(seq_len))
        return {"pair_fraction": seen / causal, "exact": True,
                "branches": {"blocks": tiles(b, lambda i: min(i + 1, k + 1))}}
    if kind == "nsa":
        w, sb, n_sel = settings["window"], settings["select_block"], settings["num_selected"]
        seen = 0
        for t in range(seq_len):
            i = t // sb
            # forced selections: block 0 and the 2 most recent blocks (selection.nsa_select, n_local=2)
            forced = [(0, min(sb, t + 1))] + [(j * sb, min((j + 1) * sb, t + 1)) for j in (i - 1, i) if j >= 0]
            n_forced = len({0, *(j for j in (i - 1, i) if j >= 0)})
            extra = max(0, min(i + 1, n_sel) - n_forced) * sb
            seen += min(t + 1, _union_length([(max(0, t - w + 1), t + 1), *forced]) + extra)
        n_cmp = (seq_len - settings["compress_block"]) // settings["compress_stride"] + 1
        return {"pair_fraction": seen / causal, "exact": False,
                "branches": {"selected": tiles(sb, lambda i: min(i + 1, n_sel)),
                             "window": tiles(settings["block_size"], window_tiles(settings["block_size"], w)),
                             "compressed_keys": n_cmp}}
    raise ValueError(f"attention kind: got {kind!r}, allowed: dense, sliding_window, moba, nsa")


def _union_length(intervals) -> int:
    total, end = 0, 0
    for lo, hi in sorted(intervals):
        lo = max(lo, end)
        if hi > lo:
            total += hi - lo
            end = hi
    return total


# ------------------------------------------------------------------------------------ running
# Under --budget-s the tail is what gets skipped: both issues' baselines and main variants come first.
PRIORITY = [("attention", "dense"), ("attention", "nsa"), ("attention", "moba"), ("moe", "no_rounding"),
            ("moe", "token_rounding"), ("attention", "sliding_window")]


def run_order(selection: dict[str, list[str]]) -> list[tuple]:
    return [(g, n) for g, n in PRIORITY if n in selection.get(g, [])]


def run_variant(group: str, name: str, overrides: list[str], root: str, timeout_s: float, env: dict) -> dict:
    run_dir = os.path.join(root, group, name)
    os.makedirs(run_dir, exist_ok=True)
    # hydra.run.dir: the run directory (run_dir follows it) and Hydra's own files, none in the checkout
    cmd = [sys.executable, "-m", "sparsetron.train", f"hydra.run.dir={run_dir}", *overrides]
    log_path = os.path.join(run_dir, "log.txt")
    start = time.time()
    status, returncode = "ok", None
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        timeout=timeout_s, cwd=REPO).returncode
            if returncode:
                status = "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
    wall = time.time() - start
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    result = {"status": status, "returncode": returncode, "overrides": overrides, "command": " ".join(cmd),
              "wall_s": round(wall, 2)}
    if status != "ok":
        result["log_tail"] = log_text[-4000:]
    for line in log_text.splitlines():
        if line.startswith("sparsetron: ") and " params" in line:
            result["startup_line"] = line
    result.update(read_run(run_dir))
    config = os.path.join(run_dir, "config.yaml")
    if os.path.exists(config):
        result["resolved"] = _resolved_sections(config)
    return result


def _resolved_sections(path: str) -> dict:
    """The parts of the saved config that define the comparison (the trainer writes config.yaml)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # reading back is a nicety; the overrides above are exact
        return {}
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    keep = ("model", "attention", "moe", "train", "optim", "data")
    out = {k: cfg.get(k) for k in keep}
    if out["model"] and out["model"].get("mlp") != "moe":
        out.pop("moe")
    if out["attention"]:  # only the fields the chosen kind reads
        fields = _ATTENTION_FIELDS[out["attention"]["kind"]]
        out["attention"] = {k: v for k, v in out["attention"].items() if k in fields}
    return out


_ATTENTION_FIELDS = {
    "dense": ("kind",),
    "sliding_window": ("kind", "window", "block_size", "deterministic_backward"),
    "moba": ("kind", "moba_block", "moba_top_k", "deterministic_backward"),
    "nsa": ("kind", "block_size", "window", "compress_block", "compress_stride", "compress_kind", "select_block",
            "num_selected", "deterministic_backward"),
}


def read_run(run_dir: str) -> dict:
    """Curves and timings from metrics.jsonl (last record per (kind, step), as train.metrics.read_metrics)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {"train": {"step": [], "loss": []}, "val": {"step": [], "loss": []}, "steps_done": 0}
    records: dict[str, dict[int, dict]] = {"train": {}, "val": {}}
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a timeout kill
                    continue
                records.setdefault(r["kind"], {})[r["step"]] = r
    train = [records["train"][s] for s in sorted(records["train"])]
    val = [records["val"][s] for s in sorted(records["val"])]
    out = {
        "train": {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train]},
        "val": {"step": [r["step"] for r in val], "loss": [r["loss"] for r in val]},
        "steps_done": train[-1]["step"] if train else 0,
    }
    if train:
        steady = train[len(train) // 5:]  # skip warm-up (Triton compilation, allocator growth)
        out["train_s"] = round(sum(r["step_time_s"] for r in train), 2)
        out["tokens_per_s_median"] = statistics.median(r["tokens_per_s"] for r in steady)
        out["step_time_s_median"] = statistics.median(r["step_time_s"] for r in steady)
        out["peak_mem_gib"] = max(r["mem_gib"] for r in train)
        if any("mfu" in r for r in steady):
            out["mfu_median"] = statistics.median(r.get("mfu", 0.0) for r in steady)
        routing = routing_summary(train)
        if routing:
            out["routing"] = routing
    return out


def routing_summary(train: list[dict]) -> dict | None:
    """MoE routing from the trainer's per-step records (moe/L<i>/...: the last micro-batch of each
    step): tokens dropped / added by token rounding, experts per token, load imbalance, and the
    per-expert loads logged at eval steps (with rounding they must all be multiples of tile_m)."""
    layers = sorted({k.split("/")[1] for r in train for k in r if k.startswith("moe/")}, key=_layer_number)
    if not layers:
        return None

    def per_step(key):
        return [sum(r.get(f"moe/{layer}/{key}", 0.0) for layer in layers) for r in train]

    def per_layer_mean(key):
        return {layer: statistics.fmean(r[f"moe/{layer}/{key}"] for r in train if f"moe/{layer}/{key}" in r)
                for layer in layers if any(f"moe/{layer}/{key}" in r for r in train)}

    loads = {r["step"]: {layer: r[f"moe/{layer}/expert_load"] for layer in layers if f"moe/{layer}/expert_load" in r}
             for r in train if any(f"moe/{layer}/expert_load" in r for layer in layers)}
    dropped, added = per_step("tokens_dropped"), per_step("tokens_added")
    imbalance = per_layer_mean("max_over_mean_load")
    return {
        "layers": layers,
        "series": {"step": [r["step"] for r in train], "tokens_dropped": dropped, "tokens_added": added,
                   "max_over_mean_load": [statistics.fmean(r[f"moe/{layer}/max_over_mean_load"] for layer in layers)
                                          for r in train]},
        "tokens_dropped_per_step_mean": statistics.fmean(dropped),
        "tokens_added_per_step_mean": statistics.fmean(added),
        "experts_per_token_mean": statistics.fmean(per_layer_mean("experts_per_token").values()),
        "max_over_mean_load_mean": statistics.fmean(imbalance.values()),
        "max_over_mean_load_per_layer": imbalance,
        "expert_load_by_step": {str(s): v for s, v in loads.items()},
    }


def _layer_number(layer: str) -> int:
    digits = "".join(c for c in layer if c.isdigit())
    return int(digits) if digits else -1


def tile_multiple_fraction(routing: dict, tile_m: int) -> float | None:
    """Share of logged per-expert loads that are multiples of tile_m (1.0 with rounding on)."""
    loads = [v for by_layer in routing["expert_load_by_step"].values() for per in by_layer.values() for v in per]
    return sum(v % tile_m == 0 for v in loads) / len(loads) if loads else None


# ------------------------------------------------------------------------------------ summary
def summarize(report: dict) -> dict:
    """Final validation loss per variant and its difference to the group's baseline; a variant that
    did not reach the last step has no final (its curve is still in the JSON)."""
    summary = {}
    for group, g in report["groups"].items():
        steps = report["steps"]
        finals = {}
        for name, v in g["variants"].items():
            val = v.get("val", {"step": [], "loss": []})
            done = v.get("status") == "ok" and val["step"] and val["step"][-1] == steps
            finals[name] = val["loss"][-1] if done else None
        base = finals.get(g["baseline"])
        rows = {}
        for name, v in g["variants"].items():
            final = finals[name]
            row = {"status": v.get("status"), "final_val_loss": final,
                   "diff_vs_baseline": (final - base) if final is not None and base is not None else None}
            train = v.get("train", {"loss": []})["loss"]
            if train:
                tail = train[-max(1, len(train) // 10):]
                row["final_train_loss_mean_last_10pct"] = statistics.fmean(tail)
            if "tokens_per_s_median" in v:
                row["tokens_per_s_median"] = v["tokens_per_s_median"]
            if group == "attention" and "coverage" in v:
                row["attended_pair_fraction"] = v["coverage"]["pair_fraction"]
            if "routing" in v:
                r = v["routing"]
                row["tokens_dropped_per_step_mean"] = r["tokens_dropped_per_step_mean"]
                row["tokens_added_per_step_mean"] = r["tokens_added_per_step_mean"]
                row["expert_loads_tile_multiple_fraction"] = r.get("expert_loads_tile_multiple_fraction")
                row["dropped_fraction"], row["added_fraction"] = r.get("dropped_fraction"), r.get("added_fraction")
            rows[name] = row
        summary[group] = {"baseline": g["baseline"], "final_step": steps, "variants": rows}
    return summary


def environment(commit_arg: str | None) -> dict:
    out = {"python": platform.python_version(), "hostname": platform.node()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        out["device"] = _gpu_name() or (torch.cuda.get_device_name() if torch.cuda.is_available() else
                                        (platform.processor() or "cpu"))
    except ImportError:
        out["torch"] = out["cuda"] = None
        out["device"] = "unknown"
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["git_commit"], out["git_dirty"] = commit_arg, None
    if commit_arg is None:
        try:
            out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                               text=True, check=True).stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, check=False)
            out["git_dirty"] = bool(status.stdout.strip())
        except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (GPU machine)
            out["git_commit"] = os.environ.get("SPARSETRON_GIT_COMMIT")
    return out


def _gpu_name() -> str | None:
    """From nvidia-smi, so that this process creates no CUDA context next to the training runs."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return names[0].strip() if names else None


def write_json(report: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ plotting
def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); weight 0 returns the values."""
    out, acc = [], 0.0
    for n, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**n) if weight > 0 else v)
    return out


def plot(report: dict, json_path: str) -> list[str]:
    """One PNG per group: smoothed train loss, val loss, and smoothed train loss minus the baseline's."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed: no PNG (re-draw later with --plot-only JSON)", flush=True)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = os.path.splitext(json_path)[0]
    weight = report.get("smooth", 0.0)
    paths = []
    for group, g in report["groups"].items():
        curves = {n: v for n, v in g["variants"].items() if v.get("train", {}).get("step")}
        if not curves:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        base = curves.get(g["baseline"])
        base_train = dict(zip(base["train"]["step"], ema(base["train"]["loss"], weight))) if base else {}
        for n, v in curves.items():
            label = n if v.get("status") == "ok" else f"{n} ({v.get('status')})"
            if v.get("coverage") and n != g["baseline"]:
                label += f", {v['coverage']['pair_fraction']:.0%} of causal attn"
            smooth = ema(v["train"]["loss"], weight)
            line, = axes[0].plot(v["train"]["step"], smooth, label=label, linewidth=1.2)
            if v["val"]["step"]:
                axes[1].plot(v["val"]["step"], v["val"]["loss"], "o-", color=line.get_color(), label=label,
                             markersize=3)
            common = [(s, y - base_train[s]) for s, y in zip(v["train"]["step"], smooth) if s in base_train]
            if common and n != g["baseline"]:
                axes[2].plot(*zip(*common), color=line.get_color(), label=label, linewidth=1.2)
        axes[0].set_title(f"train loss (EMA {weight})")
        axes[1].set_title("validation loss")
        axes[2].set_title(f"train loss (EMA) minus {g['baseline']}")
        axes[2].axhline(0.0, color="black", linewidth=0.8)
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("cross-entropy (nats/token)")
        # zoom past the first steps' large losses, where the curves are indistinguishable
        tails = [y for v in curves.values() for y in ema(v["train"]["loss"], weight)[len(v["train"]["loss"]) // 10:]]
        if tails and max(tails) > min(tails):
            axes[0].set_ylim(min(tails) - 0.05, max(tails) + 0.05)
        fig.suptitle(f"{group}: {report.get('device')} | preset {report.get('preset')}, {report.get('steps')} steps")
        fig.tight_layout()
        path = f"{stem}_{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------- table
def print_table(report: dict) -> None:
    print()
    head = (f"{'group':9s} {'variant':15s} {'status':8s} {'steps':>5s} {'final val':>9s} {'d vs base':>9s} "
            f"{'train(last10%)':>14s} {'tok/s':>9s} {'wall s':>7s} {'attn frac':>9s} {'dropped/added':>18s}")
    print(head)
    print("-" * len(head))
    for group, s in report["summary"].items():
        g = report["groups"][group]
        for name, row in s["variants"].items():
            v = g["variants"][name]

            def num(x, fmt):
                width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()))
                return format(x, fmt) if isinstance(x, (int, float)) else "-".rjust(width)

            routing = "-"
            if row.get("dropped_fraction") is not None:
                routing = f"{row['dropped_fraction']:.2%}/{row['added_fraction']:.2%}"
            print(f"{group:9s} {name:15s} {row['status'] or '-':8s} {v.get('steps_done', 0):5d} "
                  f"{num(row['final_val_loss'], '9.4f')} {num(row['diff_vs_baseline'], '+9.4f')} "
                  f"{num(row.get('final_train_loss_mean_last_10pct'), '14.4f')} "
                  f"{num(row.get('tokens_per_s_median'), '9.0f')} {num(v.get('wall_s'), '7.1f')} "
                  f"{num(row.get('attended_pair_fraction'), '9.3f')} {routing:>18s}")


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu")
    ap.add_argument("--group", choices=[*GROUPS, "all"], default="all")
    ap.add_argument("--variants", default="",
                    help="comma-separated subset (each group's baseline must be in it); default: all of the group")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the preset's)")
    ap.add_argument("--eval-every", type=int, default=None, help="validation interval (default: the preset's)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "loss_curves.json"))
    ap.add_argument("--runs-dir", default="", help="keep the run directories here (default: a temporary dir)")
    ap.add_argument("--cache-dir", default="", help="data.cache_dir for every variant (default: the CLI's)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra CLI override for every variant (repeatable)")
    ap.add_argument("--variant-timeout", type=float, default=None, help="seconds per variant (default: the preset's)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip a variant when elapsed + the slowest variant so far would pass this (0: no budget)")
    ap.add_argument("--keep-interpret", action="store_true",
                    help="cpu-smoke: keep TRITON_INTERPRET for the runs (slow); default: the reference paths")
    ap.add_argument("--git-commit", default=None, help="record this commit (default: git rev-parse HEAD)")
    ap.add_argument("--plot-only", default="", metavar="JSON", help="only re-draw the PNGs of this JSON")
    args = ap.parse_args(argv)

    if args.plot_only:
        if not os.path.isfile(args.plot_only):
            ap.error(f"--plot-only: {args.plot_only!r} is not a file")
        return args
    preset = PRESETS[args.preset]
    args.steps = preset["steps"] if args.steps is None else args.steps
    args.eval_every = min(preset["eval_every"], args.steps) if args.eval_every is None else args.eval_every
    args.variant_timeout = preset["variant_timeout_s"] if args.variant_timeout is None else args.variant_timeout
    if args.steps < 1:
        ap.error(f"--steps: got {args.steps}, must be >= 1")
    if args.eval_every < 1 or args.eval_every > args.steps:
        ap.error(f"--eval-every: got {args.eval_every}, must be in [1, --steps={args.steps}]")
    if args.variant_timeout <= 0:
        ap.error(f"--variant-timeout: got {args.variant_timeout}, must be > 0")
    if args.budget_s < 0:
        ap.error(f"--budget-s: got {args.budget_s}, must be >= 0")
    for item in args.extra:
        if "=" not in item:
            ap.error(f"--set: got {item!r}, expected KEY=VALUE (a training CLI override)")
    groups = list(GROUPS) if args.group == "all" else [args.group]
    allowed = {g: list(variants_of(args.preset, g)) for g in groups}
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        known = [v for g in groups for v in allowed[g]]
        for v in wanted:
            if v not in known:
                ap.error(f"--variants: unknown variant {v!r} for --group {args.group}, allowed: {', '.join(known)}")
        selection = {g: [v for v in allowed[g] if v in wanted] for g in groups}
        selection = {g: vs for g, vs in selection.items() if vs}
        for g, vs in selection.items():
            if BASELINE[g] not in vs:
                ap.error(f"--variants: group {g} needs its baseline {BASELINE[g]!r} for the comparison")
    else:
        selection = allowed
    args.selection = selection
    return args


def annotate(result: dict, group: str, name: str, preset: str) -> None:
    """Attention coverage at the run's sequence length; the tile check of the MoE expert loads. The
    run's saved config wins over the preset's (a --set override changes both)."""
    resolved = result.get("resolved", {})
    if group == "attention":
        seq_len = (resolved.get("train") or {}).get("seq_len", PRESETS[preset]["seq_len"])
        settings = resolved.get("attention") or ATTENTION[preset][name]
        result["coverage"] = {"seq_len": seq_len, **attention_coverage(settings, seq_len)}
    if "routing" in result:
        tile_m = (resolved.get("moe") or {}).get("tile_m", PRESETS[preset]["tile_m"])
        result["routing"]["tile_m"] = tile_m
        result["routing"]["expert_loads_tile_multiple_fraction"] = tile_multiple_fraction(result["routing"], tile_m)
        train, moe = resolved.get("train") or {}, resolved.get("moe") or {}
        if train and moe:  # top-k assignments of one micro-batch over all MoE layers: what rounding moves
            r = result["routing"]
            per_step = train["micro_batch_size"] * train["seq_len"] * moe["top_k"] * len(r["layers"])
            r["topk_assignments_per_micro_batch"] = per_step
            r["dropped_fraction"] = r["tokens_dropped_per_step_mean"] / per_step
            r["added_fraction"] = r["tokens_added_per_step_mean"] / per_step


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            report = json.load(f)
        for path in plot(report, args.plot_only):
            print(f"wrote {path}")
        return 0

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    extra = list(args.extra) + ([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.preset == "cpu-smoke" and not args.keep_interpret:
        env.pop("TRITON_INTERPRET", None)  # the plain-PyTorch reference paths: seconds, not minutes
    report = {
        "script": "benchmarks/loss_curves.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "preset": args.preset, "steps": args.steps, "eval_every": args.eval_every,
        "smooth": PRESETS[args.preset]["smooth"],
        **environment(args.git_commit),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": "train loss: cross-entropy of each optimizer step (MoE aux loss excluded); val loss: mean CE "
                 "over the same held-out windows at every eval step; all variants of a group share seed, data "
                 "order, model and schedule (NSA's extra gate projection takes draws from the same RNG stream, so "
                 "its weights after layer 0's attention are different random draws of the same distributions). "
                 "attention coverage: share of causal (query, key) pairs attended "
                 "(NSA: upper bound, compressed branch not counted) and tiles computed per branch.",
        "groups": {},
    }
    root = os.path.abspath(args.runs_dir) if args.runs_dir else tempfile.mkdtemp(prefix="loss_curves_")
    start, slowest = time.time(), 0.0
    try:
        for group, name in run_order(args.selection):
            g = report["groups"].setdefault(group, {"baseline": BASELINE[group], "variants": {}})
            overrides = variant_overrides(args.preset, group, name, args.steps, args.eval_every, extra)
            elapsed = time.time() - start
            if args.budget_s and elapsed + slowest > args.budget_s:
                result = {"status": "skipped", "overrides": overrides,
                          "reason": f"budget: {elapsed:.0f} s elapsed + {slowest:.0f} s (slowest so far) > "
                                    f"--budget-s {args.budget_s:.0f}"}
            else:
                print(f"[{elapsed:6.0f} s] {group}/{name}: {' '.join(overrides)}", flush=True)
                result = run_variant(group, name, overrides, root, args.variant_timeout, env)
                slowest = max(slowest, result["wall_s"])
            annotate(result, group, name, args.preset)
            val = result.get("val", {}).get("loss")
            print(f"[{time.time() - start:6.0f} s] {group}/{name}: {result['status']}, {result.get('steps_done', 0)} "
                  f"steps, wall {result.get('wall_s', 0):.1f} s, last val {val[-1] if val else None}", flush=True)
            if result["status"] in ("failed", "timeout"):
                print(result.get("log_tail", "")[-1500:], flush=True)
            g["variants"][name] = result
            report["summary"] = summarize(report)
            report["wall_s"] = round(time.time() - start, 1)
            write_json(report, out)
    finally:
        if not args.runs_dir:
            shutil.rmtree(root, ignore_errors=True)
    report["summary"] = summarize(report)
    write_json(report, out)
    for path in plot(report, out):
        print(f"wrote {path}")
    print(f"wrote {out}")
    print_table(report)
    bad = [f"{g}/{n}" for g, s in report["summary"].items() for n, r in s["variants"].items()
           if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
