"""The GPU presets as the README runs them, against a nanoGPT-style anchor in the same process.

    python benchmarks/presets.py --out $OUT/presets.json                          # GPU: gpu_125m + anchor
    python benchmarks/presets.py --presets gpu_125m gpu_1b --out $OUT/presets.json  # + the 1B preset
    python benchmarks/presets.py --smoke --out /tmp/presets.json                   # CPU, tiny, seconds
    python benchmarks/presets.py --profile ...   # + 2 profiled steps after the timed ones (trace, memory)

sparsetron: `experiment=<preset>` through the trainer API (compose + train, what `sparsetron-train
experiment=<preset>` runs) with only these changes: --steps steps, no evaluation, no checkpoint, no wandb,
no plot. Its defaults pick compile / Triton kernels (train.compile=auto, model.fused_kernels=auto); the
JSON records what they resolved to. tokens/s = the median over the steps after --warmup of the trainer's
own per-step numbers (metrics.jsonl, each step synchronised).

Anchor (nanoGPT habit): Hugging Face `LlamaForCausalLM` of the same shape (same FLOPs per token; SDPA
attention), the forward and cross-entropy under one `torch.compile`, bf16 autocast over fp32 weights, grad
clip 1.0 + fused AdamW (benchmarks/dense_speed.py's optimizer step), on random tokens, with the preset's
micro-batch and gradient accumulation: the same token budget per step and the same number of steps, timed
the same way (each step synchronised, median after --warmup). `--anchors gpt2` adds HF GPT-2 (124M at the
preset's width and depth; its own, larger FLOPs per token: MHA, 4x GELU MLP, 50257 vocab).
MFU = tokens/s * flops_per_token / peak, the PaLM accounting of train/metrics.py, the datasheet dense bf16
peak (train/metrics.py) or --peak-tflops; none on a CPU unless given. Writes one JSON (device, versions,
commit, shapes, per-run numbers, ratio sparsetron / anchor) and prints a table last.
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

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `sparsetron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparsetron.benchmarks.dense_speed import (_version, free_memory, is_oom, make_optimizer,  # noqa: E402
                                               optimizer_step, random_batch, sync)
from sparsetron.train.metrics import flops_per_token, parameter_counts, peak_flops, read_metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --smoke: a CPU-sized model and batch on top of each preset (the code path, not the speed)
SMOKE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.vocab_size=512", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=4",
         "data.max_corpus_bytes=400000", "train.device=cpu"]
PROFILED_STEPS = 2  # --profile: steps run after the timed ones under SPARSETRON_PROFILE
QUIET = ["train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false", "logging.wandb.mode=disabled",
         "logging.plot=false"]


def steady(values, warmup: int):
    if len(values) <= warmup:
        raise ValueError(f"--warmup={warmup} leaves no timed step of {len(values)}; raise --steps")
    return values[warmup:]


# ------------------------------------------------------------------------------------ sparsetron
def run_sparsetron(preset: str, args, root: str) -> tuple:
    """The preset through the trainer API. Returns (result, composed config after the run)."""
    from omegaconf import OmegaConf

    from sparsetron.train.cli import compose
    from sparsetron.train.trainer import train

    run_dir = os.path.join(root, preset)
    extra = PROFILED_STEPS if args.profile else 0  # profiled after the timed steps, not timed
    overrides = [f"experiment={preset}", f"train.max_steps={args.steps + extra}", *QUIET,
                 *(SMOKE if args.smoke else [])]
    if args.peak_tflops:
        overrides.append(f"logging.peak_tflops={args.peak_tflops}")
    cfg = compose(overrides, run_dir=run_dir)
    previous = os.environ.pop("SPARSETRON_PROFILE", None)
    if args.profile:
        os.environ["SPARSETRON_PROFILE"] = f"{args.steps}:{args.steps + extra}"
    start = time.perf_counter()
    try:
        train(cfg)
    finally:
        os.environ.pop("SPARSETRON_PROFILE", None)
        if previous is not None:
            os.environ["SPARSETRON_PROFILE"] = previous
    wall = time.perf_counter() - start
    ran = OmegaConf.load(os.path.join(run_dir, "config.yaml"))  # with auto resolved to what ran
    recs = [r for _, r in sorted(read_metrics(run_dir)["train"].items())][:args.steps]
    times = steady([r["step_time_s"] for r in recs], args.warmup)
    t = ran.train
    profile = keep_profile(run_dir, preset, args) if args.profile else None
    return {"name": "sparsetron", "overrides": overrides, "profile": profile, "compile": ran.train.compile,
            "fused_kernels": ran.model.fused_kernels, "activation_checkpointing": ran.model.activation_checkpointing,
            "micro_batch": t.micro_batch_size, "accumulation": t.global_batch_size // t.micro_batch_size,
            "step_time_s": statistics.median(times), "first_step_s": recs[0]["step_time_s"],
            "tokens_per_s": t.global_batch_size * t.seq_len / statistics.median(times),
            "peak_mem_gib": max(r["mem_gib"] for r in recs), "final_loss": recs[-1]["loss"],
            "steps": len(recs), "wall_s": round(wall, 1)}, ran


def keep_profile(run_dir: str, preset: str, args) -> dict:
    """Copy the profile files (train/profiling.py) next to --out; their names and sizes for the JSON."""
    src = os.path.join(run_dir, "profile")
    dst = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"presets_profile_{preset}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return {"steps": f"{args.steps}..{args.steps + PROFILED_STEPS - 1}", "dir": dst,
            "files": {name: os.path.getsize(os.path.join(dst, name)) for name in sorted(os.listdir(dst))}}


# ---------------------------------------------------------------------------------------- anchor
class _LossModel(torch.nn.Module):
    """forward + cross-entropy in one module, so that one torch.compile covers both (nanoGPT's model
    computes its loss inside forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        logits = self.model(input_ids=tokens).logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hf_model(kind: str, m):
    """Hugging Face model of the preset's shape: `llama` the same architecture, `gpt2` GPT-2 at its width
    and depth (its own vocabulary of 50257 and 4x MLP)."""
    import transformers

    if kind == "llama":
        conf = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
            rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
            attention_bias=False, mlp_bias=False)
    elif kind == "gpt2":
        conf = transformers.GPT2Config(vocab_size=50257, n_positions=m.max_seq_len, n_embd=m.dim, n_layer=m.n_layers,
                                       n_head=m.n_heads)
    else:
        raise ValueError(f"--anchors: got {kind!r}, allowed: llama, gpt2, none")
    model = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa")
    return model, conf.vocab_size


def anchor_flops_per_token(model, n_layers: int, dim: int, seq: int) -> float:
    """PaLM accounting (train/metrics.py) of an HF model: its embedding tables (token, and GPT-2's
    positions) are the parameters left out."""
    embedding = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Embedding))
    total = sum(p.numel() for p in model.parameters())
    return 6.0 * (total - embedding) + 12.0 * n_layers * dim * seq


def run_anchor(kind: str, ran, device, args) -> dict:
    t, m = ran.train, ran.model
    torch.manual_seed(0)
    model, vocab = hf_model(kind, m)
    model = model.to(device)
    fpt = anchor_flops_per_token(model, m.n_layers, m.dim, t.seq_len)
    compiled = device.type == "cuda" and not args.no_compile  # CPU smoke: eager (no C++ toolchain wait)
    loss_model = _LossModel(model)
    step_loss = torch.compile(loss_model) if compiled else loss_model
    opt = make_optimizer(model, device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    micro = t.micro_batch_size
    while True:  # the preset's micro-batch; halved (more accumulation, same tokens) if HF does not fit
        try:
            accum = t.global_batch_size // micro
            batches = [random_batch(vocab, micro, t.seq_len, device, seed=i) for i in range(accum)]
            times, losses = [], []
            for _ in range(args.steps):
                start = time.perf_counter()
                for tokens, targets in batches:
                    with amp:
                        loss = step_loss(tokens, targets) / accum
                    loss.backward()
                optimizer_step(model, opt)
                sync(device)
                times.append(time.perf_counter() - start)
                losses.append(loss.item() * accum)
            break
        except RuntimeError as err:
            if not is_oom(err) or micro == 1:
                raise
            opt.zero_grad(set_to_none=True)
            free_memory(device)
            micro //= 2
    timed = steady(times, args.warmup)
    out = {"name": f"hf-{kind}" + ("+compile" if compiled else " (eager)"),
           "transformers_class": type(model).__name__, "attention": "sdpa", "compile": compiled,
           "micro_batch": micro, "accumulation": t.global_batch_size // micro,
           "params": sum(p.numel() for p in model.parameters()), "flops_per_token": fpt,
           "step_time_s": statistics.median(timed), "first_step_s": times[0],
           "tokens_per_s": t.global_batch_size * t.seq_len / statistics.median(timed),
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "final_loss": losses[-1], "steps": len(times), "data": "random tokens"}
    del step_loss, loss_model, model, opt, batches
    torch._dynamo.reset()
    free_memory(device)
    return out


# ------------------------------------------------------------------------------------------ main
def commit() -> str:
    if os.environ.get("SPARSETRON_COMMIT"):  # a copy without .git (the device machine)
        return os.environ["SPARSETRON_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return head + ("+dirty" if dirty.strip() else "") if head else "unknown"
    except OSError:
        return "unknown"


def measure_preset(preset: str, args, root: str) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    free_memory(device)
    ours, ran = run_sparsetron(preset, args, root)
    torch._dynamo.reset()  # the trainer's compiled blocks are gone with it; so are their caches now
    t, m = ran.train, ran.model
    counts = parameter_counts(m, ran.attention, ran.moe)
    fpt = flops_per_token(m, t.seq_len, counts["active"], counts["embedding"])
    peak = peak_flops(device, args.peak_tflops)
    ours["flops_per_token"] = fpt
    runs = [ours]
    for kind in args.anchors:
        free_memory(device)
        try:
            runs.append(run_anchor(kind, ran, device, args))
        except Exception as err:  # noqa: BLE001  (a failing anchor is reported, the preset result is kept)
            runs.append({"name": f"hf-{kind}", "error": f"{type(err).__name__}: {str(err)[:600]}"})
    for r in runs:
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
    anchor = next((r for r in runs[1:] if "tokens_per_s" in r), None)
    return {
        "preset": preset,
        "shapes": {"model": {k: m[k] for k in ("name", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                               "ffn_dim", "tie_embeddings")},
                   "params": counts["total"], "seq_len": t.seq_len, "global_batch": t.global_batch_size,
                   "tokens_per_step": t.global_batch_size * t.seq_len, "steps": args.steps,
                   "timed_steps": args.steps - args.warmup},
        "runs": runs,
        "ratio_tokens_per_s": ours["tokens_per_s"] / anchor["tokens_per_s"] if anchor else None,
        "anchor": anchor["name"] if anchor else None,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["gpu_125m"], help="configs/experiment names")
    ap.add_argument("--anchors", nargs="+", default=["llama"], help="llama, gpt2 (or none)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (each side, same tokens)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians (compilation)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU peak per GPU (default: datasheet)")
    ap.add_argument("--no-compile", action="store_true", help="anchor eager (the default compiles it on CUDA)")
    ap.add_argument("--profile", action="store_true",
                    help=f"then profile {PROFILED_STEPS} more sparsetron steps (SPARSETRON_PROFILE): trace and, on "
                         "CUDA, memory snapshot copied next to --out")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: checks the code path only")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "presets.json"))
    args = ap.parse_args(argv)
    args.anchors = [a for a in args.anchors if a != "none"]
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --smoke for the CPU code-path check")
    if args.steps <= args.warmup or args.warmup < 0:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 0")
    for a in args.anchors:
        if a not in ("llama", "gpt2"):
            ap.error(f"--anchors: got {a!r}, allowed: llama, gpt2, none")
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        results = [measure_preset(p, args, root) for p in args.presets]
    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    report = {
        "device": device, "smoke": args.smoke,
        "versions": {"torch": torch.__version__, "triton": _version("triton"),
                     "transformers": _version("transformers"), "python": platform.python_version()},
        "commit": commit(), "command": " ".join(["benchmarks/presets.py", *(argv or sys.argv[1:])]),
        "peak_flops": peak_flops(torch.device("cpu" if args.smoke else "cuda"), args.peak_tflops),
        "flops_accounting": "PaLM: 6*(params - embedding tables) + 12*n_layers*dim*seq per token",
        "timing": f"median step time over steps {args.warmup + 1}..{args.steps}, each step synchronised; "
                  "tokens/s = global batch * seq / that",
        "results": results, "wall_s": round(time.time() - start, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  torch {report['versions']['torch']}  triton {report['versions']['triton']}  "
          f"transformers {report['versions']['transformers']}")
    print(f"{'preset':10} {'run':22} {'mb x acc':>8} {'tokens/s':>11} {'MFU':>6} {'step s':>7} {'1st s':>6} "
          f"{'peak GiB':>8}")
    for res in report["results"]:
        for r in res["runs"]:
            if "error" in r:
                print(f"{res['preset']:10} {r['name']:22} ERROR {r['error'][:90]}")
                continue
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            mem = "-" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.1f}"
            print(f"{res['preset']:10} {r['name']:22} {r['micro_batch']:>3} x {r['accumulation']:<3} "
                  f"{r['tokens_per_s']:>11,.0f} {mfu:>6} {r['step_time_s']:>7.4f} {r['first_step_s']:>6.1f} {mem:>8}")
        if res["ratio_tokens_per_s"]:
            print(f"{res['preset']:10} sparsetron / {res['anchor']}: {res['ratio_tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
