"""`auto` for model.fused_kernels and train.compile: fast on a CUDA GPU, unchanged on the CPU.

On CUDA, auto compiles each block (torch.compile) and keeps the chunked Triton linear-CE, leaving the
blocks' elementwise work to inductor -- the fastest dense variant measured (BENCHMARKS.md, 1B at seq 4096:
61.7 % MFU, against 60.5 % with every Triton kernel under compile and 56.8 % eager with them). Where auto
leaves compile off, the blocks get the Triton RMSNorm/RoPE/SwiGLU instead (eager + kernels: 56.8 % against
44.2 % plain eager), except under ZeRO-3 (below). On the CPU both stay off, so a CPU run computes exactly
what it did before. Layouts nobody has measured under compile keep it off and say so.

resolve() turns the two fields into true/false/"loss" before the model is built, and returns one line
naming what auto chose on CUDA and why it left anything off."""

from typing import List, Optional

import torch

# kernels/rmsnorm keeps one row per program in registers (a power-of-two block of the model width)
RMSNORM_MAX_DIM = 65536


def compile_blockers(cfg) -> List[str]:
    """Why per-block torch.compile is not turned on by auto for this job (empty: it is)."""
    p, why = cfg.parallel, []
    if cfg.model.mlp == "moe":
        why.append("MoE blocks route to data-dependent expert sizes (recompiles)")
    if cfg.attention.kind != "dense":
        why.append(f"attention.kind={cfg.attention.kind} runs its own Triton kernels")
    if p.pp > 1 or p.tp > 1:
        why.append("tensor/pipeline-parallel blocks are not measured under torch.compile yet")
    if _zero3(p):
        why.append("DeepSpeed ZeRO-3/offload hooks parameters in and out around each block")
    elif p.zero_stage == 2 or p.engine == "deepspeed":
        why.append("the DeepSpeed engine is not measured under torch.compile yet")
    if cfg.sparsity.enabled:
        why.append("N:M fine-tuning re-applies masks around the blocks")
    return why


def _zero3(p) -> bool:
    return p.zero_stage == 3 or p.offload_param != "none" or p.offload_optimizer != "none"


def fused_blockers(cfg) -> List[str]:
    """Why auto does not use the Triton kernels at all (empty: they support this job)."""
    if _zero3(cfg.parallel):
        # ZeRO-3 gathers a module's weights in that module's forward; the fused RMSNorm and linear-CE read
        # the norm and head weights from the enclosing block / model, where they are still partitioned
        return ["ZeRO-3 partitions the norm/head weights the kernels read outside their modules"]
    if cfg.model.dim > RMSNORM_MAX_DIM:
        return [f"model.dim={cfg.model.dim} > {RMSNORM_MAX_DIM}, the widest row the Triton RMSNorm keeps in registers"]
    return []


def resolve(cfg, device: torch.device) -> Optional[str]:
    """Replace `auto` in cfg.train.compile and cfg.model.fused_kernels by what runs on `device`. Returns the
    line to print (None when nothing was auto, or on the CPU, where auto is simply off)."""
    compile_auto, fused_auto = cfg.train.compile == "auto", cfg.model.fused_kernels == "auto"
    if not (compile_auto or fused_auto):
        return None
    cuda = device.type == "cuda"
    notes = []
    if compile_auto:
        blockers = compile_blockers(cfg) if cuda else ["not CUDA"]
        cfg.train.compile = not blockers
        if cuda:
            notes.append("train.compile=auto -> " + ("on (each block)" if not blockers else f"off: {'; '.join(blockers)}"))
    if fused_auto:
        if not cuda:
            cfg.model.fused_kernels = False
        elif fused_blockers(cfg):
            cfg.model.fused_kernels = False
            notes.append(f"model.fused_kernels=auto -> off: {'; '.join(fused_blockers(cfg))}")
        elif cfg.train.compile:
            cfg.model.fused_kernels = "loss"  # inductor fuses the blocks' elementwise ops better than our kernels
            notes.append("model.fused_kernels=auto -> loss (Triton linear-CE; the compiled blocks fuse the rest)")
        else:
            cfg.model.fused_kernels = True
            notes.append("model.fused_kernels=auto -> on (Triton RMSNorm, RoPE, SwiGLU, linear-CE)")
    return ("sparsetron: " + ", ".join(notes) + " (set true/false to choose)") if notes else None
