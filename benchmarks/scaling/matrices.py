"""Named benchmark matrices for benchmarks/scaling/run.py: which layouts to launch, with what model.

A layout is one training run: world size (processes = GPUs or CPU ranks), tp / pp / dp / ep,
ZeRO stage, engine, micro / global batch, extra Hydra overrides, and the scaling curves it is a
point of (scaling_math.py: "strong" = fixed global batch, "weak" = fixed batch per worker).
`Layout.overrides()` is the exact command line tail handed to `python -m sparsetron.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple


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
                "weak": list(self.weak)}


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
GPU_BASE = ("model=1b", "train.seq_len=2048", "train.device=cuda", "train.precision=bf16", *QUIET)
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

MATRICES: Dict[str, Matrix] = {m.name: m for m in (CPU_SMOKE, GPU8, GPU_WEAK)}


def get(name: str) -> Matrix:
    if name not in MATRICES:
        raise ValueError(f"--matrix {name!r} unknown; choose from {sorted(MATRICES)}")
    return MATRICES[name]
