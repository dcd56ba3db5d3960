"""Dense single-GPU training speed (issue 7): sparsetron's Llama against torchtitan's Llama3, same
shapes, same random tokens, same optimizer step (grad-norm clip 1.0 + fused AdamW), one process.

    python benchmarks/dense_speed.py --out $OUT/dense_speed.json          # GPU, ~1B (configs/model/1b.yaml)
    python benchmarks/dense_speed.py --dry-run --out /tmp/dense_speed.json  # CPU, tiny model, no torchtitan
    python benchmarks/dense_speed.py --dry-run --titan ...                  # CPU, tiny, + torchtitan eager

Per variant: the largest micro-batch that fits (estimated from a 2-sequence probe, then lowered on
OOM), warm-up steps, then timed steps between CUDA events. tokens/s = micro-batch * seq * steps /
time; MFU = tokens/s * flops_per_token / peak, with the PaLM accounting of train/metrics.py
(6 * non-embedding params + 12 * layers * dim * seq per token) and the datasheet dense bf16 peak.
One profiled step of the best sparsetron variant and of torchtitan gives the time split (GPU kernel
time grouped by kernel-name patterns). `--max-seq` finds the longest sequence that trains at
micro-batch 1. Phases run by priority and are skipped (and say so) when --budget-s runs out.

torchtitan (0.3) anchor, its own single-GPU recipe: Llama3 model definition (fused wqkv, FlexAttention
causal mask), its selective op-level activation checkpointing rule (save matmul and attention outputs,
recompute every second matmul; re-implemented here because torchtitan's module imports tyro), then
torch.compile(fullgraph=True) per block, FSDP2 on a 1-rank group for bf16 compute with fp32 master
weights (falls back to bf16 autocast if that fails, and says so), its chunked linear + CE loss with the
CE compiled. Only torchtitan's model/loss modules are imported; its package __init__s, which need
tyro and friends, are bypassed.

torchtitan 0.3 targets a newer torch than the GPU image's 2.11: `torchtitan_compat_shims` adapts its
calls (only where the installed torch lacks the argument, and only where the adaptation is exact) and
every result lists what it changed ("compat_shims"). If the FlexAttention anchor still fails, a
modified anchor "torchtitan-sdpa" runs the same torchtitan model with its ScaledDotProductAttention
(causal SDPA: the same math as its block-causal mask on one document per row), labelled as modified.
"""

import argparse
import contextlib
import gc
import importlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
import types

import torch

if __package__ in (None, ""):  # run as a script: make `sparsetron` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparsetron.configs.schema import ModelConfig  # noqa: E402
from sparsetron.train.metrics import flops_per_token, peak_flops  # noqa: E402
from sparsetron.train.model import Llama  # noqa: E402
from sparsetron.train.model.checkpointing import selective_context_fn  # noqa: E402

MODEL_1B = dict(name="1b", vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192,
                rope_theta=500000.0, tie_embeddings=False)
MODEL_TINY = dict(name="tiny", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                  rope_theta=10000.0, tie_embeddings=False)

# (name, compile blocks, kernels, activation checkpointing). kernels: "torch" = plain PyTorch ops,
# "triton" = model.fused_kernels (Triton RMSNorm/RoPE/SwiGLU/linear-CE), "triton-loss" = only the
# Triton linear-CE, the blocks left to inductor.
VARIANTS = {
    "compile+triton-loss": (True, "triton-loss", "none"),
    "eager+torch": (False, "torch", "none"),
    "eager+triton": (False, "triton", "none"),
    "compile+torch": (True, "torch", "none"),
    "compile+triton": (True, "triton", "none"),
    "compile+triton-loss+selective-ac": (True, "triton-loss", "selective"),
}

# Kernel-name patterns for the time split, first match wins (lower-case substrings).
TIME_SPLIT = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_sdp", "flex")),
    ("loss", ("cross_entropy", "crossentropy", "nll_loss", "softmax", "logsumexp", "_ce_")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lpnorm")),
    ("norms", ("rms", "rsqrt", "meanops", "layer_norm")),
    ("matmuls", ("gemm", "matmul", "cutlass", "sm90_xmma", "sm80_xmma", "nvjet", "cublas", "_mm_", "wgmma")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for group, patterns in TIME_SPLIT:
        if any(p in low for p in patterns):
            return group
    return "other"


def palm_flops_per_token(cfg, seq_len: int, model) -> float:
    """PaLM appendix B via train/metrics.py; the embedding table is the only parameter left out."""
    return flops_per_token(cfg, seq_len, model.num_params(), model.embed.weight.numel())


# --------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def random_batch(vocab, mb, seq, device, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (mb, seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def time_steps(step, batch, device, warmup: int, steps: int) -> float:
    """Seconds per step: warm-up, then `steps` steps between two CUDA events (wall clock on CPU)."""
    for _ in range(warmup):
        step(*batch)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(*batch)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    return (time.perf_counter() - t0) / steps


def profile_split(step, batch, device) -> dict:
    """GPU kernel time of one step, grouped by TIME_SPLIT (ms and fraction)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(*batch)
        sync(device)
    totals = {g: 0.0 for g, _ in TIME_SPLIT}
    totals["other"] = 0.0
    top = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # CPU-side ops: their kernels are counted as their own (CUDA) entries
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = evt.self_cuda_time_total
        totals[classify_kernel(evt.key)] += us / 1e3
        top.append((us / 1e3, evt.key))
    total = sum(totals.values())
    top.sort(reverse=True)
    return {"kernel_ms": {k: round(v, 2) for k, v in totals.items()},
            "fraction": {k: round(v / total, 4) if total else 0.0 for k, v in totals.items()},
            "total_kernel_ms": round(total, 2),
            "top_kernels": [{"ms": round(ms, 2), "name": name[:120], "group": classify_kernel(name)}
                            for ms, name in top[:12]]}


def optimizer_step(model, opt):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the trainer's default optim.grad_clip
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------- sparsetron
def build_sparsetron(shape: dict, seq: int, kernels: str, ac: str, compile_blocks: bool, device):
    cfg = ModelConfig(**shape, max_seq_len=seq, fused_kernels=kernels != "torch", activation_checkpointing=ac)
    torch.manual_seed(0)
    model = Llama(cfg).to(device)
    if kernels == "triton-loss":  # keep the chunked linear-CE, let inductor fuse the block's elementwise ops
        for block in model.layers:
            block.fused = block.attn.fused = block.mlp.fused = False
    if compile_blocks:
        for block in model.layers:
            block.compile()
    opt = make_optimizer(model, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(tokens, targets):  # what the trainer's engine does per micro-batch, minus the host syncs
        with amp:
            loss = model(tokens, targets)
        loss.backward()
        optimizer_step(model, opt)
        return loss

    return cfg, model, step


# ------------------------------------------------------------------------------------ torchtitan
def import_torchtitan():
    """torchtitan's model and loss modules without running the package __init__s that pull in
    tyro, datasets, the trainer, ... (not in the GPU image, and not needed)."""
    spec = importlib.util.find_spec("torchtitan")
    if spec is None:
        raise ImportError("torchtitan is not installed (pip install --no-deps torchtitan==0.3.0 spmd_types)")
    root = os.path.dirname(spec.origin)

    def bare_package(name):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split(".")[1:])]
        sys.modules.setdefault(name, module)
        return sys.modules[name]

    config = bare_package("torchtitan.config")
    config.TORCH_DTYPE_MAP = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    for sub in ("configs", "configurable", "function"):
        for key, value in vars(importlib.import_module(f"torchtitan.config.{sub}")).items():
            if not key.startswith("_"):
                setattr(config, key, value)
    bare_package("torchtitan.distributed")
    bare_package("torchtitan.models.llama3")
    import torchtitan

    model_mod = importlib.import_module("torchtitan.models.llama3.model")
    return torchtitan, model_mod


def torchtitan_compat_shims(attention_module, create_block_mask=None) -> list:
    """Adapt torchtitan's torch calls to the installed torch, exactly or not at all; returns what
    was changed (one line each), the same list on every call.

    create_block_mask(separate_full_blocks=...): torchtitan passes True (False only in its
    batch-invariant mode). Torch versions without the argument (2.11) always separate the full
    blocks, i.e. behave as True, so dropping True changes nothing; False cannot be emulated and
    raises."""
    if hasattr(attention_module, "_sparsetron_compat_shims"):
        return attention_module._sparsetron_compat_shims
    if create_block_mask is None:
        from torch.nn.attention.flex_attention import create_block_mask
    shims = []
    if "separate_full_blocks" not in inspect.signature(create_block_mask).parameters:
        compiled = attention_module._compiled_create_block_mask  # torch.compile(create_block_mask)

        def create_block_mask_compat(*args, separate_full_blocks=True, **kwargs):
            if not separate_full_blocks:
                raise TypeError(f"torch {torch.__version__} create_block_mask has no separate_full_blocks; "
                                "its fixed behaviour (True) cannot give torchtitan's batch-invariant False")
            return compiled(*args, **kwargs)

        attention_module._compiled_create_block_mask = create_block_mask_compat
        shims.append(f"torchtitan.models.common.attention.create_attention_mask: drop create_block_mask kwarg "
                     f"separate_full_blocks=True (torch {torch.__version__} lacks it and always separates full "
                     "blocks, i.e. the same BlockMask)")
    attention_module._sparsetron_compat_shims = shims
    return shims


def build_torchtitan(shape: dict, seq: int, device, precision: str, compile_blocks: bool = True,
                     attention: str = "flex"):
    """torchtitan's Llama3 and its single-GPU recipe. attention="sdpa" is the modified anchor: its
    ScaledDotProductAttention (causal) in place of FlexAttention; everything else unchanged."""
    torchtitan, tt = import_torchtitan()
    attention_module = importlib.import_module("torchtitan.models.common.attention")
    shims = torchtitan_compat_shims(attention_module)
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torchtitan.components.loss import ChunkedLossWrapper
    from torchtitan.config import CompileConfig
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.config_utils import get_attention_config, make_ffn_config, make_gqa_config

    if attention not in ("flex", "sdpa"):
        raise ValueError(f"build_torchtitan: attention must be flex or sdpa, got {attention!r}")
    # get_attention_config refuses "sdpa" for language models (it cannot take document masks); with
    # one document per row causal SDPA is the same attention, so the modified anchor builds it directly
    inner_attention = (get_attention_config("flex") if attention == "flex"
                       else attention_module.ScaledDotProductAttention.Config())
    d, n_heads = shape["dim"], shape["n_heads"]
    linear = {"weight": partial(torch.nn.init.trunc_normal_, std=0.02), "bias": torch.nn.init.zeros_}
    ones = {"weight": torch.nn.init.ones_}
    layers = [tt.Llama3TransformerBlock.Config(
        attention_norm=RMSNorm.Config(normalized_shape=d, param_init=ones),
        ffn_norm=RMSNorm.Config(normalized_shape=d, param_init=ones),
        attention=make_gqa_config(dim=d, n_heads=n_heads, n_kv_heads=shape["n_kv_heads"], fuse_qkv=True,
                                  wqkv_param_init=linear, wo_param_init=linear,
                                  inner_attention=inner_attention,
                                  rope=ComplexRoPE.Config(dim=d // n_heads, max_seq_len=seq,
                                                          theta=shape["rope_theta"], scaling="llama")),
        feed_forward=make_ffn_config(dim=d, hidden_dim=shape["ffn_dim"], w1_param_init=linear,
                                     w2w3_param_init=linear),
    ) for _ in range(shape["n_layers"])]
    vocab = shape["vocab_size"]
    cfg = tt.Llama3Model.Config(
        dim=d, vocab_size=vocab, layers=layers, norm=RMSNorm.Config(normalized_shape=d, param_init=ones),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=d,
                                        param_init={"weight": partial(torch.nn.init.normal_, std=1.0)}),
        lm_head=Linear.Config(in_features=d, out_features=vocab, param_init=linear))
    torch.manual_seed(0)
    with torch.device(device):
        model = cfg.build()
    model.init_states(buffer_device=device)

    # its recipe: AC wrapper per block, then per-block torch.compile(fullgraph=True), then FSDP
    torch._dynamo.config.capture_scalar_outputs = True
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for name, block in list(model.layers.named_children()):
        wrapped = checkpoint_wrapper(block, context_fn=selective_context_fn(recompute_every_other_mm=True),
                                     preserve_rng_state=True, early_stop=False)
        model.layers.register_module(name, wrapped)
    for block in model.layers.children() if compile_blocks else ():
        block.compile(fullgraph=True)

    if device.type != "cuda":  # CPU check of the anchor's code path: fp32, no FSDP
        precision_used, amp = "fp32 (CPU)", contextlib.nullcontext()
    else:
        precision_used, amp = "autocast-bf16", torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "fsdp" and device.type == "cuda":
        try:
            fsdp_single_rank(model, device)
            precision_used, amp = "fsdp2-bf16-params-fp32-reduce", contextlib.nullcontext()
        except Exception as err:  # noqa: BLE001  (recorded, then the autocast fallback)
            precision_used = f"autocast-bf16 (fsdp2 failed: {type(err).__name__}: {str(err)[:200]})"

    loss_fn = ChunkedLossWrapper(ChunkedLossWrapper.Config(),
                                 compile_config=CompileConfig(enable=compile_blocks, components=["model", "loss"]))
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    opt = make_optimizer(model, device)
    masks_cache = {}

    def step(tokens, targets):
        key = tuple(tokens.shape)
        if key not in masks_cache:  # torchtitan builds the block-causal mask from positions per batch
            positions = torch.arange(tokens.shape[1], device=device).expand(tokens.shape[0], -1)
            masks_cache[key] = (positions, model.get_attention_masks(positions) if attention == "flex" else None)
        positions, masks = masks_cache[key]
        with amp:
            hidden = model(tokens, positions, masks)
            loss, _ = loss_fn(hidden, targets, torch.tensor(float(targets.numel()), device=device))
        loss.backward()
        optimizer_step(model, opt)
        return loss

    n_params = sum(p.numel() for p in model.parameters())
    info = {"torchtitan_version": getattr(torchtitan, "__version__", "0.3.0"), "precision": precision_used,
            "activation_checkpointing": "torchtitan SelectiveAC rule (save mm/attention, recompute every 2nd mm)",
            "attention": "FlexAttention (block-causal mask = causal for one document per row)" if attention == "flex"
            else "MODIFIED ANCHOR: torchtitan ScaledDotProductAttention (causal SDPA) instead of its FlexAttention",
            "modifications": [m for m, on in (("SDPA attention", attention != "flex"),
                                              ("bf16 autocast instead of FSDP2 mixed precision",
                                               device.type == "cuda" and not precision_used.startswith("fsdp2")))
                              if on],
            "compile": compile_blocks,
            "loss": "ChunkedLossWrapper(8 chunks) + " + ("compiled " if compile_blocks else "") + "CrossEntropyLoss",
            "n_params": n_params, "compat_shims": list(shims)}
    info["modified_anchor"] = bool(info["modifications"])
    return model, step, info


def fsdp_single_rank(model, device):
    """torchtitan always applies FSDP2, also on one GPU, for its mixed-precision policy."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model.tok_embeddings, mp_policy=mp)
    fully_shard([model.norm, model.lm_head], mp_policy=mp, reshard_after_forward=False)  # as torchtitan
    for block in model.layers.children():
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


# --------------------------------------------------------------------------------- measurement
def fit_micro_batch(step, vocab, seq, device, args, static_bytes_of):
    """Largest micro-batch that trains: probe with 2 sequences, extrapolate the activation memory
    linearly, then lower on OOM. Returns (micro_batch, note)."""
    if device.type != "cuda":
        return args.micro_batch, "fixed (--micro-batch)"
    cap = torch.cuda.get_device_properties(device).total_memory * args.mem_fraction
    probe = random_batch(vocab, 2, seq, device, seed=1)
    step(*probe)  # compile + optimizer state
    step(*probe)
    sync(device)
    static = torch.cuda.memory_allocated(device) + static_bytes_of()  # params + Adam state + grads
    torch.cuda.reset_peak_memory_stats(device)
    step(*probe)
    sync(device)
    per_seq = max((torch.cuda.max_memory_allocated(device) - static) / 2, 1)
    return max(1, min(args.max_micro_batch, int((cap - static) // per_seq))), f"probe: {per_seq / 2**30:.2f} GiB/seq"


def measure(name, build, vocab, seq, device, args, flops_token_of, mb=None):
    """Build, fit the micro-batch, time. Any failure is recorded, not raised."""
    out = {"name": name, "seq_len": seq}
    t0 = time.time()
    model = step = None
    try:
        model, step, info = build()
        out.update(info)
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        note = "given"
        if mb is None:
            mb, note = fit_micro_batch(step, vocab, seq, device, args, lambda: grads)
        while True:
            try:
                free_memory(device)
                batch = random_batch(vocab, mb, seq, device, seed=2)
                sec = time_steps(step, batch, device, args.warmup, args.steps)
                break
            except RuntimeError as err:
                if not is_oom(err) or mb == 1:
                    raise
                mb = mb - 1 if mb <= 8 else int(mb * 0.8)
                note += f"; OOM, lowered to {mb}"
        tokens_s = mb * seq / sec
        fpt = flops_token_of(model)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
        out.update(micro_batch=mb, micro_batch_note=note, step_s=sec, tokens_per_s=tokens_s,
                   flops_per_token=fpt, model_tflops_per_s=tokens_s * fpt / 1e12,
                   mfu=tokens_s * fpt / peak if peak else None,
                   peak_mem_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None)
        if args.profile and device.type == "cuda":
            out["time_split"] = profile_split(step, batch, device)
    except Exception as err:  # noqa: BLE001  (one failing variant must not end the one-shot run)
        out["error"] = f"{type(err).__name__}: {str(err)[:600]}"
    out["wall_s"] = round(time.time() - t0, 1)
    del model, step
    torch._dynamo.reset()
    free_memory(device)
    print(json.dumps({k: v for k, v in out.items() if k != "time_split"}), flush=True)
    return out


def sparsetron_runner(shape, seq, device, variant):
    compile_blocks, kernels, ac = VARIANTS[variant]

    def build():
        cfg, model, step = build_sparsetron(shape, seq, kernels, ac, compile_blocks, device)
        return model, step, {"impl": "sparsetron", "variant": variant, "compile": compile_blocks,
                             "kernels": kernels, "activation_checkpointing": ac, "n_params": model.num_params()}

    flops = lambda model: palm_flops_per_token(ModelConfig(**shape), seq, model)  # noqa: E731
    return build, flops


def titan_flops(shape, seq):
    """Same PaLM accounting on torchtitan's parameters (its fused wqkv has the same count)."""
    def flops(model):
        n = sum(p.numel() for p in model.parameters())
        return 6.0 * (n - shape["vocab_size"] * shape["dim"]) + 12.0 * shape["n_layers"] * shape["dim"] * seq
    return flops


def measure_titan(shape, seq, device, args, over_budget, est_s):
    """The torchtitan anchor at `seq`: its recipe first; if FSDP2's mixed precision fails in the step
    (torch 2.11 on an H200: "data is not allocated yet"; the same code runs on CPU with torch 2.13),
    the same model, compile and loss under bf16 autocast; if its FlexAttention cannot run, the
    modified SDPA anchor. Each attempt is recorded; the first that trains is the anchor."""
    out = []
    compile_blocks = device.type == "cuda"  # the dry run checks the code path eagerly (no C++ compile)
    order = {"auto": ["flex", "sdpa"], "flex": ["flex"], "sdpa": ["sdpa"]}[args.titan_attention]
    precisions = [args.titan_precision] + (["autocast"] if args.titan_precision == "fsdp" else [])
    for attention in order:
        for precision in precisions:
            name = ("torchtitan" if attention == "flex" else "torchtitan-sdpa") + (
                "-autocast" if precision != args.titan_precision else "")
            if over_budget(f"{name} seq {seq}", est_s):
                return out
            out.append(measure(name, lambda a=attention, p=precision: build_torchtitan(
                shape, seq, device, p, compile_blocks, attention=a),
                shape["vocab_size"], seq, device, args, titan_flops(shape, seq)))
            if "error" not in out[-1]:
                return out
    return out


def max_seq_search(shape, device, args, budget_end):
    """Longest sequence that trains at micro-batch 1 (memory-lean setup: Triton kernels incl. the
    chunked linear-CE, full activation checkpointing), doubling until OOM, then one bisection."""
    tried, best = [], None
    seq, hi = args.max_seq_start, None
    while seq <= args.max_seq_cap and time.time() < budget_end:
        def build(s=seq):
            cfg, model, step = build_sparsetron(shape, s, "triton", "full", False, device)
            return model, step, {"impl": "sparsetron", "variant": "eager+triton+full-ac"}

        r = measure(f"max-seq {seq}", build, shape["vocab_size"], seq, device,
                    argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1, "profile": False}),
                    lambda m, s=seq: palm_flops_per_token(ModelConfig(**shape), s, m), mb=1)
        ok = "error" not in r
        tried.append({"seq_len": seq, "trains": ok, "peak_mem_gib": r.get("peak_mem_gib"),
                      "step_s": r.get("step_s"), "error": r.get("error", "")[:160]})
        if ok:
            best = seq
            seq = seq * 2 if hi is None else (seq + hi) // 2
        else:
            hi = seq
            if best is None or hi - best <= args.max_seq_start:
                break
            seq = (best + hi) // 2 // 1024 * 1024
            if seq <= best:
                break
    return {"max_seq_len_micro_batch_1": best, "setup": "eager, fused_kernels, activation_checkpointing=full",
            "tried": tried, "capped_at": args.max_seq_cap}


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/dense_speed.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps, no torchtitan")
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--long-variants", nargs="+", default=None,
                    help="variants also run at the longer seqs (default: the fastest one at the first seq)")
    ap.add_argument("--no-titan", action="store_true")
    ap.add_argument("--titan", action="store_true",
                    help="with --dry-run: also run the torchtitan anchor code on CPU (eager, fp32)")
    ap.add_argument("--titan-attention", choices=["auto", "flex", "sdpa"], default="auto",
                    help="auto: FlexAttention (as torchtitan), and the modified SDPA anchor only if it fails")
    ap.add_argument("--titan-precision", choices=["fsdp", "autocast"], default="fsdp")
    ap.add_argument("--max-seq", action="store_true", help="also search the longest seq at micro-batch 1")
    ap.add_argument("--max-seq-start", type=int, default=16384)
    ap.add_argument("--max-seq-cap", type=int, default=131072)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2, help="CPU / dry-run micro-batch")
    ap.add_argument("--max-micro-batch", type=int, default=64)
    ap.add_argument("--mem-fraction", type=float, default=0.92)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the datasheet peak (CPU: needed for MFU)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--budget-s", type=float, default=380.0, help="skip later phases past this wall time")
    args = ap.parse_args(argv)

    t_start = time.time()
    budget_end = t_start + args.budget_s
    if args.dry_run:
        device, shape = torch.device("cpu"), MODEL_TINY
        args.seqs = [s for s in args.seqs if s <= 256] or [64]
        args.no_titan = args.no_titan or not args.titan  # torchtitan on CPU only when asked (not installed in CI)
        args.max_seq, args.profile = False, False
        args.variants = [v for v in args.variants if not VARIANTS[v][0]]  # eager only: no C++ compile on CI
    else:
        if not torch.cuda.is_available():
            ap.error("no GPU: use --dry-run")
        device, shape = torch.device("cuda"), MODEL_1B
        torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    results, skipped = [], []

    def over_budget(what, est_s):
        if time.time() + est_s > budget_end:
            skipped.append(what)
            print(f"skip (budget): {what}", flush=True)
            return True
        return False

    first = args.seqs[0]
    # 1) the goal comparison first: sparsetron variants and torchtitan at the first seq
    for v in args.variants:
        if over_budget(f"{v} seq {first}", 45 if VARIANTS[v][0] else 15):
            continue
        build, flops = sparsetron_runner(shape, first, device, v)
        results.append(measure(v, build, shape["vocab_size"], first, device, args, flops))
        if v == args.variants[0] and not args.no_titan:
            results += measure_titan(shape, first, device, args, over_budget, 60)
    ok = [r for r in results if r.get("impl") == "sparsetron" and "tokens_per_s" in r]
    best = max(ok, key=lambda r: r["tokens_per_s"])["variant"] if ok else None
    # 2) longer sequences: the fastest variant (or the chosen ones) and torchtitan
    for seq in args.seqs[1:]:
        for v in (args.long_variants or ([best] if best else [])):
            if over_budget(f"{v} seq {seq}", 60):
                continue
            build, flops = sparsetron_runner(shape, seq, device, v)
            results.append(measure(v, build, shape["vocab_size"], seq, device, args, flops))
        if not args.no_titan:
            results += measure_titan(shape, seq, device, args, over_budget, 70)
    # 3) the longest sequence at micro-batch 1
    max_seq = None
    if args.max_seq and not over_budget("max-seq search", 40):
        max_seq = max_seq_search(shape, device, args, budget_end)

    summary = compare(results)
    shims = sorted({s for r in results for s in r.get("compat_shims", [])})
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": _version("triton"), "python": platform.python_version(),
        "dry_run": args.dry_run, "model": shape, "seqs": args.seqs, "precision": "bf16 autocast, fp32 params"
        if device.type == "cuda" else "fp32", "optimizer": "clip_grad_norm 1.0 + AdamW(fused on CUDA)",
        "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device),
        "flops_accounting": "PaLM: 6*(params - embedding) + 12*n_layers*dim*seq per token",
        "warmup_steps": args.warmup, "timed_steps": args.steps, "results": results, "summary": summary,
        "max_seq": max_seq, "skipped_for_budget": skipped, "compat_shims": shims,
        "wall_s": round(time.time() - t_start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    return report


def compare(results):
    """Per seq: the fastest sparsetron variant against torchtitan (its FlexAttention anchor; the
    modified SDPA anchor only when that one did not run, and then named as such)."""
    out = {}
    for seq in sorted({r["seq_len"] for r in results}):
        ours = [r for r in results if r["seq_len"] == seq and r.get("impl") == "sparsetron" and "tokens_per_s" in r]
        titan = [r for name in ("torchtitan", "torchtitan-autocast", "torchtitan-sdpa", "torchtitan-sdpa-autocast")
                 for r in results if r["seq_len"] == seq and r.get("name") == name and "tokens_per_s" in r]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_s"])
        row = {"best_variant": best["variant"], "tokens_per_s": best["tokens_per_s"], "mfu": best["mfu"]}
        if titan:
            mods = titan[0].get("modifications") or (["SDPA attention"] if titan[0].get("modified_anchor") else [])
            row.update(torchtitan_anchor=titan[0]["name"] + (f" (MODIFIED: {', '.join(mods)})" if mods else ""),
                       torchtitan_tokens_per_s=titan[0]["tokens_per_s"], torchtitan_mfu=titan[0]["mfu"],
                       speedup_vs_torchtitan=best["tokens_per_s"] / titan[0]["tokens_per_s"])
        out[str(seq)] = row
    return out


def _version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001
        return None


def print_table(report):
    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}  model {report['model']['name']}")
    print(f"{'variant':36} {'seq':>6} {'mb':>3} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'wall s':>6}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['name']:36} {r['seq_len']:>6}   ERROR {r['error'][:90]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['name']:36} {r['seq_len']:>6} {r['micro_batch']:>3} {r['tokens_per_s']:>10.0f} {mfu:>6} "
              f"{mem:>8} {r['wall_s']:>6}")
    for seq, row in report["summary"].items():
        if "speedup_vs_torchtitan" in row:
            print(f"seq {seq}: {row['best_variant']} is {row['speedup_vs_torchtitan']:.2f}x {row['torchtitan_anchor']}")
    if report.get("compat_shims"):
        print("torchtitan compat shims:", "; ".join(report["compat_shims"]))
    if report["max_seq"]:
        print(f"max seq at micro-batch 1: {report['max_seq']['max_seq_len_micro_batch_1']}")
    if report["skipped_for_budget"]:
        print("skipped for time:", ", ".join(report["skipped_for_budget"]))


if __name__ == "__main__":
    main()
