"""ZeRO-3 with CPU and NVMe offload on one GPU: the largest Llama-style model that trains, and its
tokens/s, through sparsetron's DeepSpeed engine, with DeepSpeed's own minimal loop (Hugging Face
LlamaForCausalLM + deepspeed.initialize + backward/step, same JSON) as the anchor in the same run.
Both use torch AdamW (foreach, on the host) as the client optimizer, so no C++ op must compile.

    python benchmarks/zero_offload.py --budget 240 --out benchmarks/results/zero_offload.json

Each attempt runs in its own subprocess (an out-of-memory kill ends that attempt only); sizes grow
until one fails or the time budget ends, and the JSON is rewritten after every attempt.
Memory arithmetic (DeepSpeed ZeRO-3 offload, bf16 model, fp32 Adam): per parameter the host keeps
fp32 master + 2 moments + fp32 gradient = 16 B (+ 2 B bf16 parameter with offload_param=cpu);
NVMe offload moves the 12 B of optimizer state (+ 2 B parameters) to disk instead.
"""

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {  # name: (dim, n_layers, n_heads, n_kv_heads, ffn_dim), vocab 32000
    "0.5b": (1536, 16, 12, 4, 4096),
    "1.3b": (2048, 24, 16, 8, 5632),
    "3b": (3072, 26, 24, 8, 8192),
    "5b": (4096, 24, 32, 8, 11008),
    "7b": (4096, 32, 32, 8, 11008),
    "10b": (5120, 32, 40, 8, 13824),
}
VOCAB, SEQ, MICRO, STEPS = 32000, 1024, 4, 3
DEVICE = os.environ.get("ZERO_OFFLOAD_DEVICE", "cuda")  # "cpu": a dry run of the script's plumbing
if DEVICE == "cpu":
    SIZES["dry"] = (64, 2, 4, 2, 128)
    SEQ = 32


def n_params(dim, layers, heads, kv, ffn, vocab=VOCAB) -> int:
    hd = dim // heads
    per_layer = dim * hd * (2 * heads + 2 * kv) + 3 * dim * ffn + 2 * dim
    return layers * per_layer + 2 * vocab * dim + dim


def ds_json(mode: str, nvme_path: str) -> dict:
    pin = DEVICE == "cuda"
    zero = {"stage": 3, "offload_param": {"device": mode, "pin_memory": pin},
            "offload_optimizer": {"device": mode, "pin_memory": pin},
            "stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 5e8}
    if mode == "nvme":
        zero["offload_param"].update(nvme_path=nvme_path, buffer_count=6, buffer_size=3e8)
        zero["offload_optimizer"]["nvme_path"] = nvme_path
    return {"train_batch_size": MICRO, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "bf16": {"enabled": DEVICE == "cuda"}, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "aio": {"block_size": 1048576, "queue_depth": 16, "thread_count": 2, "single_submit": False,
                    "overlap_events": True},
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def _timed_steps(step_fn) -> dict:
    import torch

    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    times = []
    for _ in range(STEPS):
        sync()
        t0 = time.perf_counter()
        loss = step_fn()
        sync()
        times.append(time.perf_counter() - t0)
    timed = sorted(times[1:])  # the first step builds buffers / swaps in
    median = timed[len(timed) // 2]
    return {"step_s": times, "median_step_s": median, "tokens_per_s": MICRO * SEQ / median, "last_loss": float(loss),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}


def run_sparsetron(size: str, mode: str, nvme_path: str) -> dict:
    """sparsetron's engine: the Hydra config generates the DeepSpeed JSON (overrides as a user would)."""
    import deepspeed
    import torch

    from sparsetron.parallel.engine import build_engine
    from sparsetron.parallel.runtime import init_runtime
    from sparsetron.train.cli import compose
    from sparsetron.train.model import Llama

    dim, layers, heads, kv, ffn = SIZES[size]
    cfg = compose([f"model.dim={dim}", f"model.n_layers={layers}", f"model.n_heads={heads}",
                   f"model.n_kv_heads={kv}", f"model.ffn_dim={ffn}", f"model.vocab_size={VOCAB}",
                   "model.tie_embeddings=false", f"model.max_seq_len={SEQ}", f"train.seq_len={SEQ}",
                   f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO}", f"train.precision={'bf16' if DEVICE == 'cuda' else 'fp32'}",
                   f"train.device={DEVICE}", "parallel.zero_stage=3", f"parallel.offload_optimizer={mode}",
                   f"parallel.offload_param={mode}", f"parallel.nvme_path={nvme_path}",
                   "+parallel.deepspeed_overrides.zero_optimization.stage3_max_live_parameters=1e9",
                   "+parallel.deepspeed_overrides.zero_optimization.stage3_prefetch_bucket_size=5e8"],
                  run_dir="/tmp/zero_offload")
    rt = init_runtime(DEVICE, "auto")
    from sparsetron.parallel.deepspeed_config import deepspeed_config

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, 1, rt.device)):  # never whole on one device
        model = Llama(cfg.model)
    engine = build_engine(model, cfg, rt)
    x = torch.randint(0, VOCAB, (MICRO, SEQ), device=rt.device)
    return _timed_steps(lambda: engine.train_step([(x, x)], 1e-4)["loss"])


def run_deepspeed_minimal(size: str, mode: str, nvme_path: str) -> dict:
    """The anchor: DeepSpeed's minimal training loop on transformers' Llama, the same JSON."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dim, layers, heads, kv, ffn = SIZES[size]
    deepspeed.init_distributed()
    config = ds_json(mode, nvme_path)
    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
                     tie_word_embeddings=False, torch_dtype="bfloat16" if DEVICE == "cuda" else "float32")
    hf._attn_implementation = "sdpa"
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = LlamaForCausalLM(hf)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)  # as sparsetron's
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x = torch.randint(0, VOCAB, (MICRO, SEQ), device=engine.device)

    def step():
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    return _timed_steps(step)


def one(kind: str, size: str, mode: str, nvme_path: str) -> None:
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29611"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):  # one process, but ZeRO wants a process group
        os.environ.setdefault(key, value)
    import torch

    fn = run_sparsetron if kind == "sparsetron" else run_deepspeed_minimal
    out = fn(size, mode, nvme_path)
    out.update(kind=kind, size=size, mode=mode, params=n_params(*SIZES[size]),
               device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
               torch=torch.__version__)
    print("RESULT " + json.dumps(out), flush=True)


def aio_status() -> str:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return "ok" if AsyncIOBuilder().is_compatible(verbose=False) else "async_io op incompatible (no libaio-dev)"
    except Exception as err:  # noqa: BLE001
        return f"async_io unavailable: {err}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all attempts")
    ap.add_argument("--out", default="benchmarks/results/zero_offload.json")
    ap.add_argument("--nvme-path", default="/tmp/zero_offload_nvme")
    ap.add_argument("--plan", default="sparsetron:cpu:1.3b,deepspeed:cpu:1.3b,sparsetron:nvme:1.3b,"
                                      "sparsetron:cpu:3b,sparsetron:cpu:5b,sparsetron:cpu:7b,sparsetron:cpu:10b")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(*args.one, args.nvme_path)
        return 0
    start = time.time()
    os.makedirs(args.nvme_path, exist_ok=True)
    report = {"seq_len": SEQ, "micro_batch": MICRO, "steps": STEPS, "aio": aio_status(), "attempts": [],
              "memory_note": __doc__.split("Memory arithmetic")[1].strip()}
    failed_modes = set()
    for item in args.plan.split(","):
        kind, mode, size = item.split(":")
        left = args.budget - (time.time() - start)
        if left < 30 or (kind, mode) in failed_modes:
            report["attempts"].append({"kind": kind, "mode": mode, "size": size, "skipped": "budget or smaller "
                                       "size failed" if left >= 30 else f"time budget ({args.budget} s) used up"})
            continue
        if mode == "nvme" and report["aio"] != "ok":
            report["attempts"].append({"kind": kind, "mode": mode, "size": size, "skipped": report["aio"]})
            continue
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", kind, size, mode, "--nvme-path", args.nvme_path],
                                  capture_output=True, text=True, timeout=left)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            entry = json.loads(lines[-1][7:]) if lines else {
                "kind": kind, "mode": mode, "size": size, "params": n_params(*SIZES[size]),
                "failed": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
        except subprocess.TimeoutExpired:
            entry = {"kind": kind, "mode": mode, "size": size, "failed": f"did not finish in {left:.0f} s"}
        entry["wall_s"] = time.time() - t0
        if "failed" in entry:
            failed_modes.add((kind, mode))
        report["attempts"].append(entry)
        ok = [a for a in report["attempts"] if "tokens_per_s" in a and a["kind"] == "sparsetron"]
        for mode_name in ("cpu", "nvme"):
            best = max((a for a in ok if a["mode"] == mode_name), key=lambda a: a["params"], default=None)
            report[f"largest_{mode_name}"] = None if best is None else {k: best[k] for k in ("size", "params", "tokens_per_s")}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"{kind:10s} {mode:4s} {size:5s} " + (f"{entry['tokens_per_s']:9.0f} tok/s  step {entry['median_step_s']:.2f} s"
              f"  gpu {entry['peak_gpu_gib']:.1f} GiB" if "tokens_per_s" in entry else entry.get("failed", "")[:300]),
              flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "attempts"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
