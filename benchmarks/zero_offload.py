"""ZeRO-3 with CPU and NVMe offload on one GPU: sparsetron's DeepSpeed engine against DeepSpeed's own
minimal loop, with DeepSpeed's CPU Adam on both sides (and torch AdamW as a second row), and the
largest Llama-style model that trains with CPU offload and with NVMe offload.

    python benchmarks/zero_offload.py --budget 540 --out benchmarks/results/zero_offload.json
    python benchmarks/zero_offload.py --what largest --append ...   # a second 10-minute call
    python benchmarks/zero_offload.py --smoke --out /tmp/z.json      # CPU plumbing check (tests)

Both sides get the same DeepSpeed JSON: sparsetron's generator (parallel/deepspeed_config.py, with
its offload tuning) on the same model dims; the anchor adds an `optimizer` block (type AdamW), so
DeepSpeed builds its DeepSpeedCPUAdam itself, exactly as a DeepSpeed user gets it; the torch rows
give both sides torch.optim.AdamW instead (sparsetron: optim.offload_impl=torch). The anchor's model
is transformers' LlamaForCausalLM (sdpa), built under deepspeed.zero.Init like sparsetron's.

Each attempt runs in its own subprocess (an out-of-memory kill ends that attempt only) and the
JSON is rewritten after every attempt. The largest-model search walks SIZES upwards per offload
mode; a size the host-RAM/disk estimate refuses (parallel.deepspeed_config.check_offload_fits) is
recorded as refused without running, and the walk stops at the first refusal or failure.
Memory arithmetic (ZeRO-3 offload, bf16 model, fp32 Adam): per parameter the host keeps fp32 master +
2 moments + fp32 gradient = 16 B (+ 2 B bf16 parameter with offload_param=cpu); NVMe offload moves
the 12 B of optimizer state (+ 2 B parameters) to the disk instead.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {  # name: (dim, n_layers, n_heads, n_kv_heads, ffn_dim), vocab 32000
    "0.5b": (1536, 16, 12, 4, 4096),
    "1b": (2048, 16, 16, 8, 5632),
    "1.3b": (2048, 24, 16, 8, 5632),
    "3b": (3072, 26, 24, 8, 8192),
    "5b": (4096, 24, 32, 8, 11008),
    "7b": (4096, 32, 32, 8, 11008),
    "8b": (4096, 36, 32, 8, 12288),
    "10b": (5120, 32, 40, 8, 13824),
    "13b": (5120, 40, 40, 8, 13824),
    "20b": (6144, 44, 48, 8, 16384),
}
LARGEST_SEARCH = ["3b", "5b", "7b", "8b", "10b", "13b", "20b"]
COMPARE_SIZES = ["1b", "3b"]
VOCAB, SEQ, MICRO, STEPS, LR = 32000, 1024, 4, 4, 1e-4
DEVICE = os.environ.get("ZERO_OFFLOAD_DEVICE", "cuda")  # "cpu": --smoke (the plumbing, no speed)
if DEVICE == "cpu":
    # dry_huge (~70B): never runs -- the host-RAM estimate refuses it, which the smoke test checks
    SIZES.update({"dry": (64, 2, 4, 2, 128), "dry2": (96, 2, 4, 2, 192), "dry_huge": (8192, 80, 64, 8, 28672)})
    VOCAB, SEQ, MICRO, STEPS = 512, 32, 2, 3
IMPLS = {"cpu_adam": "deepspeed_cpu_adam", "torch": "torch"}  # row name -> optim.offload_impl


def n_params(dim, layers, heads, kv, ffn, vocab=None) -> int:
    vocab = vocab or VOCAB
    hd = dim // heads
    per_layer = dim * hd * (2 * heads + 2 * kv) + 3 * dim * ffn + 2 * dim
    return layers * per_layer + 2 * vocab * dim + dim


def sparsetron_cfg(size: str, mode: str, impl: str, nvme_path: str):
    from sparsetron.train.cli import compose

    dim, layers, heads, kv, ffn = SIZES[size]
    return compose([f"model.dim={dim}", f"model.n_layers={layers}", f"model.n_heads={heads}",
                    f"model.n_kv_heads={kv}", f"model.ffn_dim={ffn}", f"model.vocab_size={VOCAB}",
                    "model.tie_embeddings=false", f"model.max_seq_len={SEQ}", f"train.seq_len={SEQ}",
                    f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO}",
                    f"train.precision={'bf16' if DEVICE == 'cuda' else 'fp32'}", f"train.device={DEVICE}",
                    "parallel.zero_stage=3", f"parallel.offload_optimizer={mode}", f"parallel.offload_param={mode}",
                    f"parallel.nvme_path={nvme_path}", f"optim.offload_impl={IMPLS[impl]}", f"optim.lr={LR}",
                    "optim.beta1=0.9", "optim.beta2=0.95", "optim.eps=1e-8", "optim.weight_decay=0.1",
                    "optim.grad_clip=1.0"], run_dir="/tmp/zero_offload")


def shared_json(cfg, device):
    """The JSON both sides train with: sparsetron's generator sized from sparsetron's own model
    (a meta-device copy: the same count the engine takes from its zero.Init parameters)."""
    import torch

    from sparsetron.parallel.deepspeed_config import deepspeed_config
    from sparsetron.train.model import Llama

    with torch.device("meta"):
        sizes = [p.numel() for p in Llama(cfg.model).parameters()]
    return deepspeed_config(cfg, 1, device, n_params=sum(sizes), largest_param=max(sizes))


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


def run_sparsetron(size: str, mode: str, impl: str, nvme_path: str) -> dict:
    """sparsetron's engine, configured as a user would (the JSON is generated from the Hydra config)."""
    import deepspeed
    import torch

    from sparsetron.parallel.engine import build_engine
    from sparsetron.parallel.runtime import init_runtime
    from sparsetron.train.model import Llama

    cfg = sparsetron_cfg(size, mode, impl, nvme_path)
    rt = init_runtime(DEVICE, "auto")
    with deepspeed.zero.Init(config_dict_or_path=shared_json(cfg, rt.device)):  # never whole on one device
        model = Llama(cfg.model)
    engine = build_engine(model, cfg, rt)
    x = torch.randint(0, VOCAB, (MICRO, SEQ), device=rt.device)
    out = _timed_steps(lambda: engine.train_step([(x, x)], LR)["loss"])
    out["optimizer"] = type(engine.ds.optimizer.optimizer).__name__
    out["zero_json"] = engine.ds_config["zero_optimization"]
    return out


def run_deepspeed_minimal(size: str, mode: str, impl: str, nvme_path: str) -> dict:
    """The anchor: DeepSpeed's minimal training loop (initialize, forward, backward, step), the same JSON,
    on transformers' Llama (ZERO_OFFLOAD_ANCHOR=hf) or on sparsetron's own module (=sparsetron: then
    only the loop and engine differ, and transformers need not be installed)."""
    import deepspeed
    import torch

    dim, layers, heads, kv, ffn = SIZES[size]
    if DEVICE == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if DEVICE == "cuda" else "gloo")
    device = torch.device(DEVICE)
    cfg = sparsetron_cfg(size, mode, impl, nvme_path)
    config = shared_json(cfg, device)
    hf_model = os.environ.get("ZERO_OFFLOAD_ANCHOR", "hf") == "hf"
    with deepspeed.zero.Init(config_dict_or_path=config):
        if hf_model:
            from transformers import LlamaConfig, LlamaForCausalLM

            hf = LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQ,
                             tie_word_embeddings=False, torch_dtype="bfloat16" if DEVICE == "cuda" else "float32")
            hf._attn_implementation = "sdpa"
            model = LlamaForCausalLM(hf)
        else:
            from sparsetron.train.model import Llama

            model = Llama(cfg.model)
    opt = None
    if impl == "cpu_adam":  # DeepSpeed builds DeepSpeedCPUAdam from the JSON, as its docs recommend
        config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1}}
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                           model_parameters=model.parameters() if opt is None else None)
    x = torch.randint(0, VOCAB, (MICRO, SEQ), device=engine.device)

    def step():
        loss = engine(input_ids=x, labels=x).loss if hf_model else engine(x, x)
        engine.backward(loss)
        engine.step()
        return loss.item()

    out = _timed_steps(step)
    out["optimizer"] = type(engine.optimizer.optimizer).__name__
    out["zero_json"] = {k: v for k, v in config["zero_optimization"].items()}
    out["anchor_model"] = "hf" if hf_model else "sparsetron"
    return out


def one(kind: str, size: str, mode: str, impl: str, nvme_path: str) -> None:
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", os.environ["ZERO_OFFLOAD_PORT"]),
                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ[key] = value  # one process, but ZeRO wants a process group (not an inherited one's port)
    import torch

    fn = run_sparsetron if kind == "sparsetron" else run_deepspeed_minimal
    out = fn(size, mode, impl, nvme_path)
    out.update(kind=kind, size=size, mode=mode, impl=impl, params=n_params(*SIZES[size]),
               peak_host_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__)
    print("RESULT " + json.dumps(out), flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def aio_status() -> str:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return "ok" if AsyncIOBuilder().is_compatible(verbose=False) else "async_io op incompatible (no libaio-dev)"
    except Exception as err:  # noqa: BLE001
        return f"async_io unavailable: {err}"


def refusal(size: str, mode: str, nvme_path: str) -> str:
    """'' when the host-RAM/disk estimate lets the size run here, else its one-line reason."""
    from sparsetron.configs.schema.validate import ConfigError
    from sparsetron.parallel.deepspeed_config import check_offload_fits

    try:
        check_offload_fits(sparsetron_cfg(size, mode, "cpu_adam", nvme_path), n_params(*SIZES[size]), 1, 1)
    except ConfigError as err:
        return str(err)
    return ""


def plan(what: str, smoke: bool):
    """(kind, mode, impl, size, purpose) in run order: the comparison pairs, then the search."""
    compare_sizes, search = (["dry"], ["dry", "dry2", "dry_huge"]) if smoke else (COMPARE_SIZES, LARGEST_SEARCH)
    out = []
    if what in ("all", "compare"):
        for mode in ("cpu", "nvme"):
            for size in compare_sizes[: 1 if mode == "nvme" else None]:
                for impl in ("cpu_adam", "torch"):
                    out += [("sparsetron", mode, impl, size, "compare"), ("deepspeed", mode, impl, size, "compare")]
    if what in ("all", "largest"):
        out += [("sparsetron", mode, "cpu_adam", size, "largest") for mode in ("cpu", "nvme") for size in search]
    return out


def summarize(report: dict) -> None:
    ok = [a for a in report["attempts"] if "tokens_per_s" in a]

    def find(kind, mode, impl, size):
        return next((a for a in ok if (a["kind"], a["mode"], a["impl"], a["size"]) == (kind, mode, impl, size)), None)

    for impl, key in (("cpu_adam", "ratio_vs_deepspeed_cpu_adam"), ("torch", "ratio_vs_deepspeed_torch_adamw")):
        ratios = {}
        for a in ok:
            if a["kind"] == "sparsetron" and a["impl"] == impl:
                anchor = find("deepspeed", a["mode"], impl, a["size"])
                if anchor:
                    ratios[f"{a['mode']}:{a['size']}"] = a["tokens_per_s"] / anchor["tokens_per_s"]
        report[key] = ratios
    report["same_json"] = {f"{a['mode']}:{a['impl']}:{a['size']}": a.get("zero_json") == b.get("zero_json")
                           for a in ok if a["kind"] == "sparsetron"
                           for b in [find("deepspeed", a["mode"], a["impl"], a["size"])] if b}
    for mode in ("cpu", "nvme"):
        best = max((a for a in ok if a["kind"] == "sparsetron" and a["impl"] == "cpu_adam" and a["mode"] == mode),
                   key=lambda a: a["params"], default=None)
        report[f"largest_params_{mode}_offload"] = None if best is None else best["params"]
        report[f"largest_{mode}_offload"] = None if best is None else {
            k: best[k] for k in ("size", "params", "tokens_per_s", "median_step_s", "peak_gpu_gib", "peak_host_gib")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all attempts")
    ap.add_argument("--out", default="benchmarks/results/zero_offload.json")
    ap.add_argument("--nvme-path", default="/tmp/zero_offload_nvme")
    ap.add_argument("--what", choices=["all", "compare", "largest"], default="all")
    ap.add_argument("--append", action="store_true", help="keep the attempts already in --out")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (plumbing only, no speed)")
    ap.add_argument("--anchor-model", choices=["auto", "hf", "sparsetron"], default="auto",
                    help="the anchor's module: transformers' Llama, or sparsetron's (auto: hf when installed)")
    ap.add_argument("--one", nargs=4, metavar=("KIND", "SIZE", "MODE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(*args.one, args.nvme_path)
        return 0
    if args.smoke and DEVICE != "cpu":  # the module constants depend on it: re-run with the CPU sizes
        os.environ["ZERO_OFFLOAD_DEVICE"] = "cpu"
        return subprocess.call([sys.executable, __file__, *sys.argv[1:]])
    start = time.time()
    os.makedirs(args.nvme_path, exist_ok=True)
    anchor = args.anchor_model
    if anchor == "auto":
        import importlib.util

        anchor = "hf" if importlib.util.find_spec("transformers") else "sparsetron"
    report = {"seq_len": SEQ, "micro_batch": MICRO, "steps": STEPS, "device": DEVICE, "aio": aio_status(),
              "anchor_model": anchor,
              "attempts": [], "memory_note": __doc__.split("Memory arithmetic")[1].strip()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.append and os.path.isfile(args.out):
        with open(args.out) as f:
            # measured attempts of this format only (the issue-3 file had no optimizer rows; skips are redone)
            report["attempts"] = [a for a in json.load(f).get("attempts", []) if "impl" in a and "skipped" not in a]
    child_env = {**os.environ, "ZERO_OFFLOAD_DEVICE": DEVICE, "ZERO_OFFLOAD_ANCHOR": anchor}
    if DEVICE == "cpu":
        child_env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    stopped = set()  # (mode) whose largest-model walk ended
    for kind, mode, impl, size, purpose in plan(args.what, args.smoke):
        base = {"kind": kind, "mode": mode, "impl": impl, "size": size, "purpose": purpose,
                "params": n_params(*SIZES[size])}
        left = args.budget - (time.time() - start)
        done = next((a for a in report["attempts"] if "tokens_per_s" in a and
                     (a["kind"], a["mode"], a["impl"], a["size"]) == (kind, mode, impl, size)), None)
        if done:  # the search's first sizes are the comparison's: measured once
            continue
        reason = ("time budget used up" if left < 30 else report["aio"] if mode == "nvme" and report["aio"] != "ok"
                  else "a smaller size failed or was refused" if purpose == "largest" and mode in stopped
                  else refusal(size, mode, args.nvme_path))
        if reason:
            report["attempts"].append({**base, "skipped": reason})
            if purpose == "largest":
                stopped.add(mode)
            print(f"{kind:10s} {mode:4s} {impl:8s} {size:5s} skipped: {reason[:200]}", flush=True)
            continue
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", kind, size, mode, impl, "--nvme-path",
                                   args.nvme_path], capture_output=True, text=True, timeout=left,
                                  env={**child_env, "ZERO_OFFLOAD_PORT": str(free_port())})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            entry = {**base, **json.loads(lines[-1][7:])} if lines else {
                **base, "failed": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
        except subprocess.TimeoutExpired:
            entry = {**base, "failed": f"did not finish in {left:.0f} s"}
        entry["wall_s"] = time.time() - t0
        if "failed" in entry and purpose == "largest":
            stopped.add(mode)
        report["attempts"].append(entry)
        summarize(report)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"{kind:10s} {mode:4s} {impl:8s} {size:5s} " + (
            f"{entry['tokens_per_s']:9.0f} tok/s  step {entry['median_step_s']:.2f} s  gpu {entry['peak_gpu_gib']:.1f} GiB"
            f"  host {entry['peak_host_gib']:.1f} GiB  ({entry['optimizer']})" if "tokens_per_s" in entry
            else entry.get("failed", "")[:300]), flush=True)
    summarize(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("attempts", "memory_note")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
