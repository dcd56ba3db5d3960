"""Named benchmark matrices for benchmarks/scaling/run.py: which layouts to launch, with what model.

A layout is one training run: world size (processes = GPUs or CPU ranks), tp / pp / dp / ep,
ZeRO stage, engine, micro / global batch, extra Hydra overrides, and the scaling curves it is a
point of (scaling_math.py: "strong" = fixed global batch, "weak" = fixed batch per worker).
`Layout.overrides()` is the exact command line tail handed to `python -m sparsetron.train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    micro_batch: int
    global_batch: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero_stage: int = 0
    engine: str = "auto"
    extra: Tuple[str, ...] = ()  # more Hydra overrides (model size, sequence parallel, MoE, ...)
    strong: Tuple[str, ...] = ()  # strong-scaling curves this run is a point of
    weak: Tuple[str, ...] = ()  # weak-scaling curves
    steps: int = 0  # train steps; 0 = the matrix's
    loss_ref: str = ""  # layout whose per-step losses this run's must match (same model, data, global batch)
    comm_timer: Optional[bool] = None  # None = the harness's flag; False where its syncs would hide overlap
    env: Tuple[Tuple[str, str], ...] = ()  # extra environment ("{run_dir}" is replaced by the run's directory)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def overrides(self) -> List[str]:
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.dp={self.dp}",
                f"parallel.ep={self.ep}", f"parallel.zero_stage={self.zero_stage}", f"parallel.engine={self.engine}",
                f"train.micro_batch_size={self.micro_batch}", f"train.global_batch_size={self.global_batch}",
                *self.extra]

    def describe(self) -> dict:
        return {"name": self.name, "world": self.world, "tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep,
                "zero_stage": self.zero_stage, "engine": self.engine, "micro_batch": self.micro_batch,
                "global_batch": self.global_batch, "extra": list(self.extra), "strong": list(self.strong),
                "weak": list(self.weak), "steps": self.steps, "loss_ref": self.loss_ref, "comm_timer": self.comm_timer,
                "env": dict(self.env)}


@dataclass(frozen=True)
class Matrix:
    name: str
    description: str
    device: str  # cpu | cuda: cpu matrices probe the machine (probe.py) for the perf-model cluster
    steps: int
    warmup: int  # logged steps skipped before the medians
    base: Tuple[str, ...]  # overrides shared by every layout
    layouts: Tuple[Layout, ...] = field(default_factory=tuple)

    def layout(self, name: str) -> Layout:
        for lay in self.layouts:
            if lay.name == name:
                return lay
        raise ValueError(f"matrix {self.name!r} has no layout {name!r}; layouts: {[x.name for x in self.layouts]}")


# Shared by every matrix: no eval, no checkpoint, no wandb / progress bar / loss plot, a line per step.
QUIET = ("train.eval_every=0", "checkpoint.save_final=false", "checkpoint.every=0", "logging.wandb.mode=disabled",
         "logging.progress_bar=false", "logging.plot=false", "logging.log_every=1")

# ---------------------------------------------------------------------------------------- CPU
# ~3.5M parameters (d=256, 4 layers, GQA 8/4, vocab 2048, tied embeddings), 128-token sequences, 8 per step. Big
# enough that matmuls (not Python overhead) are most of a step; small enough that the six runs
# finish in ~2-3 minutes on 2 cores with one thread per rank.
CPU_MODEL = ("model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=704",
             "model.vocab_size=2048", "train.seq_len=128", "data.max_corpus_bytes=400000", "optim.warmup_steps=2")
ALL_STRONG = ("ddp", "tp", "pp", "zero1")

CPU_SMOKE = Matrix(
    name="cpu_smoke",
    description="2 CPU ranks over gloo (OMP_NUM_THREADS=1 each): DDP at 1 and 2 ranks, TP2, PP2, DeepSpeed ZeRO-1; "
                "strong scaling at 8 sequences per step, weak scaling at 8 per rank",
    device="cpu", steps=14, warmup=4,
    base=("train.device=cpu", *QUIET, *CPU_MODEL),
    layouts=(
        Layout("w1_single", 1, 4, 8, strong=ALL_STRONG, weak=("ddp",)),
        Layout("w2_ddp", 2, 4, 8, strong=("ddp",)),
        Layout("w2_ddp_weak", 2, 4, 16, weak=("ddp",)),
        Layout("w2_tp2", 2, 4, 8, tp=2, strong=("tp",)),
        Layout("w2_pp2", 2, 4, 8, pp=2, strong=("pp",)),
        Layout("w2_zero1_ds", 2, 4, 8, zero_stage=1, engine="deepspeed", strong=("zero1",)),
    ),
)

# ---------------------------------------------------------------------------------------- GPU
# Definitions for 1 -> 8 GPUs of one node (not run here: no GPU on the build machine, and the lent
# GPU image has no hydra/deepspeed). model=1b (~1.2B, d=2048, 16 layers, GQA 16/8), 2048 tokens.
# eager, unfused: the recorded multi-GPU points were measured so (auto would compile and fuse on CUDA)
GPU_BASE = ("model=1b", "train.seq_len=2048", "train.device=cuda", "train.precision=bf16", "train.compile=false",
            "model.fused_kernels=false", *QUIET)
SP = ("parallel.sequence_parallel=true",)
MOE_1B = ("model.mlp=moe", "moe.num_experts=8", "moe.top_k=2", "moe.expert_ffn_dim=2048")
GB = 64  # strong scaling: 64 x 2048 tokens per step at every GPU count
MB = 4


def _gpu8() -> Tuple[Layout, ...]:
    lays = [Layout("g1_single", 1, MB, GB, strong=("ddp", "zero1", "zero3", "tp", "pp", "3d")),
            Layout("g1_moe", 1, MB, GB, extra=MOE_1B, strong=("ep",))]
    for n in (2, 4, 8):
        lays += [
            Layout(f"g{n}_ddp", n, MB, GB, strong=("ddp",)),
            Layout(f"g{n}_zero1", n, MB, GB, zero_stage=1, engine="deepspeed", strong=("zero1",)),
            Layout(f"g{n}_zero3", n, MB, GB, zero_stage=3, engine="deepspeed", strong=("zero3",)),
            Layout(f"g{n}_tp{n}", n, MB, GB, tp=n, extra=SP, strong=("tp",)),
            Layout(f"g{n}_pp{min(n, 4)}", n, MB, GB, pp=min(n, 4), strong=("pp",)),
            Layout(f"g{n}_moe_ep{n}", n, MB, GB, ep=n, engine="native", extra=MOE_1B, strong=("ep",)),
        ]
    # Megatron-style 3D: TP inside, PP across, ZeRO-1 over the data-parallel rest (native engine).
    lays += [Layout("g4_tp2_pp2_zero1", 4, MB, GB, tp=2, pp=2, zero_stage=1, engine="native", extra=SP,
                    strong=("3d",)),
             Layout("g8_tp2_pp2_dp2_zero1", 8, MB, GB, tp=2, pp=2, zero_stage=1, engine="native", extra=SP,
                    strong=("3d",)),
             Layout("g8_tp4_pp2", 8, MB, GB, tp=4, pp=2, extra=SP)]
    return tuple(lays)


def _gpu_weak() -> Tuple[Layout, ...]:
    per_gpu = 16  # sequences per GPU per step (4 micro-batches of 4)
    lays = []
    for n in (1, 2, 4, 8):
        gb = per_gpu * n
        lays += [Layout(f"w{n}_ddp", n, MB, gb, weak=("ddp",)),
                 Layout(f"w{n}_zero1", n, MB, gb, zero_stage=1, engine="deepspeed", weak=("zero1",)),
                 Layout(f"w{n}_zero3", n, MB, gb, zero_stage=3, engine="deepspeed", weak=("zero3",))]
        if n >= 2:
            lays.append(Layout(f"w{n}_tp2", n, MB, gb, tp=2, extra=SP, weak=("tp2",)))
        if n >= 4:
            lays.append(Layout(f"w{n}_pp2", n, MB, gb, pp=2, weak=("pp2",)))
    return tuple(lays)


GPU8 = Matrix("gpu8", "1B model, 1->8 GPUs at a fixed global batch (64 x 2048 tokens): DDP, ZeRO-1/3 (DeepSpeed), "
                      "TP2/4/8 (+SP), PP2/4, 3D, and an 8-expert MoE with EP2/4/8",
              device="cuda", steps=20, warmup=5, base=GPU_BASE, layouts=_gpu8())
GPU_WEAK = Matrix("gpu_weak", "1B model, 1->8 GPUs at 16 x 2048 tokens per GPU: DDP, ZeRO-1/3, TP2, PP2",
                  device="cuda", steps=20, warmup=5, base=GPU_BASE, layouts=_gpu_weak())


# ---------------------------------------------------------------------------------------- 4 GPUs
# What one lent 4-GPU host shows in two ~9-minute device calls (`--only` splits them; README).
# Eager (no torch.compile: it would add ~1 min of compilation to every one of ~25 launches).
# - weak scaling of the 1B model, 8 sequences x 2048 tokens per GPU per step, DP through DeepSpeed
#   ZeRO-1 / ZeRO-3 and plain DDP; the baseline is the best single-GPU run (native, no ZeRO);
# - a ~9B model (Llama-3-8B layer shapes, 40 layers, 32K vocab: 116 GB of fp32 weights + grads +
#   Adam states before activations, more than one 80 GB H100 or 141 GB H200 holds) at TP4, PP4 with
#   each schedule, TP2xPP2 and TP2/PP2 x DP2 with ZeRO-1, all at 8 x 2048 tokens per step;
# - an 8-expert MoE 1B with EP2/EP4 on the fused Triton layer and on the argsort + torch._grouped_mm
#   layer (moe.implementation=grouped_mm), the comm timer on to split out the all-to-all time.
# Losses: each multi-GPU run names the run whose first steps it must reproduce (loss_ref): a
# single-GPU run at the same global batch where one GPU holds the model, else the TP4 run.
W_MB, W_PER_GPU = 4, 8
GPU4_BASE = tuple(o for o in GPU_BASE if not o.startswith("model="))  # the model is per layout here
ONE_B = ("model=1b",)
# lr 3e-4: the default 1.5e-3 spiked the 9B's loss to 21 at step 2 (seen at 4 H200s), which magnifies bf16
# differences between layouts in the loss comparison
BIG = ("model=8b", "model.vocab_size=32000", "model.n_layers=40", "optim.lr=3e-4")
BIG_GB = 8
MOE = (*ONE_B, *MOE_1B)
# PP over NCCL hung before its first step (pp=4, 4 H200s, 2026-11-26). These make a hang fail in 60 s with
# the stuck collective named, and dump NCCL's flight recorder (every rank's pending ops) into the run dir.
PP_DEBUG_ENV = (("SPARSETRON_DIST_TIMEOUT_S", "60"), ("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"),
                ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"), ("TORCH_FR_DUMP_TEMP_FILE", "{run_dir}/nccl_trace_rank_"),
                ("NCCL_DEBUG", "WARN"))
MOE_GMM = (*MOE, "moe.implementation=grouped_mm")
NO_TIMER = False  # comm timer off: its device syncs serialise DeepSpeed's / DDP's overlapped collectives


def _gpu4() -> Tuple[Layout, ...]:
    lays = [Layout("w1", 1, W_MB, W_PER_GPU, extra=ONE_B, weak=("ddp", "zero1", "zero3"), comm_timer=NO_TIMER),
            Layout("g1_gb32", 1, W_MB, 4 * W_PER_GPU, extra=ONE_B, steps=6, comm_timer=NO_TIMER)]
    for n in (2, 4):
        gb = W_PER_GPU * n
        ref = "g1_gb32" if gb == 32 else ""
        lays += [Layout(f"w{n}_zero1", n, W_MB, gb, zero_stage=1, engine="deepspeed", extra=ONE_B, weak=("zero1",),
                        loss_ref=ref, comm_timer=NO_TIMER),
                 Layout(f"w{n}_zero3", n, W_MB, gb, zero_stage=3, engine="deepspeed", extra=ONE_B, weak=("zero3",),
                        loss_ref=ref or f"w{n}_zero1", comm_timer=NO_TIMER)]
    lays.append(Layout("w4_ddp", 4, W_MB, 4 * W_PER_GPU, extra=ONE_B, weak=("ddp",), loss_ref="g1_gb32", comm_timer=NO_TIMER))
    # MoE: expert parallel over all ranks (DP = EP), 8 sequences per GPU
    lays += [Layout("m1_fused", 1, W_MB, W_PER_GPU, extra=MOE, weak=("ep_fused",)),
             Layout("m1_gmm", 1, W_MB, W_PER_GPU, extra=MOE_GMM, weak=("ep_grouped_mm",), loss_ref="m1_fused")]
    for n in (2, 4):
        lays += [Layout(f"m{n}_ep{n}_fused", n, W_MB, W_PER_GPU * n, ep=n, engine="native", extra=MOE,
                        weak=("ep_fused",)),
                 Layout(f"m{n}_ep{n}_gmm", n, W_MB, W_PER_GPU * n, ep=n, engine="native", extra=MOE_GMM,
                        weak=("ep_grouped_mm",), loss_ref=f"m{n}_ep{n}_fused")]
    # PP on the 1B first: a cheap bisection of the NCCL hang (pp2 vs pp4, 1F1B), losses vs the 1-GPU run
    lays += [Layout("p1_pp2", 2, W_MB, 4 * W_PER_GPU, pp=2, loss_ref="g1_gb32", extra=ONE_B, comm_timer=NO_TIMER),
             Layout("p1_pp4", 4, W_MB, 4 * W_PER_GPU, pp=4, loss_ref="g1_gb32", extra=ONE_B, comm_timer=NO_TIMER)]
    # ~9B: too big for one GPU; each layout's first steps against the TP4 run's
    def big(name, micro_batch=1, more=(), loss_ref="b_tp4", **parallel):
        return Layout(name, 4, micro_batch, BIG_GB, extra=(*BIG, *more), loss_ref=loss_ref, comm_timer=NO_TIMER,
                      **parallel)

    interleaved = ("parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2")
    zero_bubble = ("parallel.pp_schedule=zero_bubble", "parallel.pp_virtual_stages=2")
    lays += [big("b_tp4", tp=4, more=SP, loss_ref=""),
             # mb=1 TP4 was CPU-bound (kernel launches of 8 micro-batches x 40 layers): 4x fewer, 4x larger
             big("b_tp4_mb4", micro_batch=4, tp=4, more=SP),
             big("b_pp4_1f1b", pp=4),
             big("b_pp4_interleaved", pp=4, more=interleaved),
             big("b_pp4_zero_bubble", pp=4, more=zero_bubble),
             big("b_tp2_pp2", tp=2, pp=2, more=SP),
             big("b_tp2_dp2_zero1", tp=2, zero_stage=1, engine="native", more=SP),
             big("b_pp2_dp2_zero1", pp=2, zero_stage=1, engine="native"),
             # the calibrated perf model's pick for this model on 4 H200s (~90 GB a GPU: not on 80 GB H100s)
             big("b_dp4_zero1", micro_batch=2, zero_stage=1, engine="deepspeed")]
    return tuple(dataclasses.replace(lay, env=PP_DEBUG_ENV) if lay.pp > 1 else lay for lay in lays)


GPU4 = Matrix("gpu4", "4 GPUs: 1B weak scaling (DDP, ZeRO-1/3), ~9B at TP4 / PP4 (1F1B, interleaved, zero bubble) / "
                      "TP2xPP2 / TP2xDP2 / PP2xDP2, MoE EP2/4 fused vs grouped_mm; losses vs single-GPU references",
              device="cuda", steps=10, warmup=4, base=GPU4_BASE, layouts=_gpu4())

MATRICES: Dict[str, Matrix] = {m.name: m for m in (CPU_SMOKE, GPU8, GPU_WEAK, GPU4)}


def get(name: str) -> Matrix:
    if name not in MATRICES:
        raise ValueError(f"--matrix {name!r} unknown; choose from {sorted(MATRICES)}")
    return MATRICES[name]
