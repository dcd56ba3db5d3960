"""Analytic performance and memory model for 4D/5D-parallel LLM training.

In the spirit of Narayanan et al. 2021 (Megatron-LM, SC21, section 3) and Korthikanti et al.
2022 (activation memory). Everything is arithmetic on the model shape, the parallel layout
and a few cluster numbers; nothing here runs on a GPU. Results are *modelled*, not
measured: use ``calibrate`` with real step times before trusting absolute numbers.

Conventions
- Rank order tp (fastest) -> cp -> dp -> pp, as Megatron's default; EP is carved out of
  DP x CP, and expert weights are TP-sharded like dense ones (expert-TP = TP).
- Collectives are rings: all-reduce moves 2(n-1)/n * bytes per rank, all-gather and
  reduce-scatter (n-1)/n * bytes (bytes = the full, unsharded buffer), plus one latency per
  ring step. A group that spans nodes is limited by the NICs of its members on one node
  (rail-optimised fabric: one NIC per GPU), capped by NVLink.
- ``nvlink_gbps`` is the spec number (both directions summed, 900 GB/s on H100); rings run
  at half of it per direction. ``inter_node_gbps`` is per GPU and per direction.
- Time per step = pipeline (micro-batches + bubble) + exposed data-parallel communication +
  optimizer (+ host offload). PP bubble fraction = (p - 1) / (v * m).
- Context parallel as sparsetron runs it (parallel/context_parallel.py): per layer an all-gather
  of the whole sequence's K,V over cp before attention (again where the core is recomputed) and a
  reduce-scatter of dK,dV, all exposed; the gathered K,V are kept for backward unless recomputed.
- Memory per GPU: ZeRO paper accounting (2 bytes params + 2 grads + 12 Adam/master per
  parameter, sharded per stage) + activations (Korthikanti et al., generalised to GQA,
  SwiGLU, flash attention and MoE) + a fixed framework overhead.

CLI:  python -m sparsetron.parallel.perf_model --model 8b --gpus 8..1024 [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

RECOMPUTE_MODES = ("none", "selective", "full")
OFFLOAD_MODES = ("none", "optimizer")
ZERO_STAGES = (0, 1, 2, 3)
BF16 = 2  # bytes per activation / communicated element
DP_BUCKET_PARAMS = 40e6  # gradient bucket (Megatron DDP default): one collective per bucket


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Decoder-only transformer shape. ``num_experts == 0`` means dense."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn: int  # dense MLP hidden size (SwiGLU: gate/up are hidden x ffn)
    vocab: int
    seq_len: int
    num_experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_expert_ffn: int = 0
    dense_layers: int = 0  # MoE models: the first N layers use the dense MLP
    gated_mlp: bool = True  # SwiGLU (3 matrices) vs GeLU (2)
    tie_embeddings: bool = False
    flash_attention: bool = True  # no s^2 score matrix kept for backward
    causal: bool = True  # flash attention skips the masked half of the scores
    dropout: bool = False

    def __post_init__(self):
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn", "vocab", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.n_heads:
            raise ValueError(f"ModelSpec.hidden={self.hidden} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelSpec.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.num_experts:
            if not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"ModelSpec.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
            if self.expert_ffn < 1:
                raise ValueError("ModelSpec.expert_ffn must be >= 1 for an MoE model")
            if not 0 <= self.dense_layers < self.n_layers:
                raise ValueError(f"ModelSpec.dense_layers={self.dense_layers} must be in [0, n_layers)")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.dense_layers

    # Parameter counts (elements).
    def attn_params(self) -> int:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 2 * h  # q, o, k, v + 2 norms

    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    def dense_mlp_params(self) -> int:
        return self.mlp_matrices() * self.hidden * self.ffn

    def expert_params_per_layer(self) -> int:
        return self.num_experts * self.mlp_matrices() * self.hidden * self.expert_ffn

    def moe_shared_params_per_layer(self) -> int:
        """Router + shared expert: replicated over EP like attention."""
        return self.hidden * self.num_experts + self.mlp_matrices() * self.hidden * self.shared_expert_ffn

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden

    def total_params(self) -> int:
        n = self.embedding_params()
        for i in range(self.n_layers):
            n += self.attn_params()
            if self.is_moe_layer(i):
                n += self.expert_params_per_layer() + self.moe_shared_params_per_layer()
            else:
                n += self.dense_mlp_params()
        return n

    def active_params(self) -> int:
        """Parameters used per token (top-k experts only)."""
        n = self.embedding_params()
        per_expert = self.mlp_matrices() * self.hidden * self.expert_ffn
        for i in range(self.n_layers):
            n += self.attn_params()
            if self.is_moe_layer(i):
                n += self.top_k * per_expert + self.moe_shared_params_per_layer()
            else:
                n += self.dense_mlp_params()
        return n

    # Forward FLOPs per token (matmuls only; norms/softmax are noise at these sizes).
    def layer_flops_per_token(self, i: int) -> dict:
        h, s = self.hidden, self.seq_len
        proj = 2 * (2 * h * h + 2 * h * self.kv_dim)
        core = 4 * s * h * (0.5 if (self.causal and self.flash_attention) else 1.0)
        if self.is_moe_layer(i):
            m = self.mlp_matrices()
            mlp = 2 * (h * self.num_experts + self.top_k * m * h * self.expert_ffn + m * h * self.shared_expert_ffn)
        else:
            mlp = 2 * self.dense_mlp_params()
        return {"proj": proj, "core": core, "mlp": mlp}

    def head_flops_per_token(self) -> float:
        return 2.0 * self.hidden * self.vocab

    def model_flops_per_token(self) -> float:
        """Training FLOPs per token without recompute (3x forward): the MFU numerator."""
        fwd = self.head_flops_per_token()
        for i in range(self.n_layers):
            fwd += sum(self.layer_flops_per_token(i).values())
        return 3.0 * fwd


@dataclass(frozen=True)
class Layout:
    """Parallel layout. ``n_gpus = tp * pp * cp * dp``; EP divides dp * cp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B)
    micro_batch: int = 1  # sequences per micro-batch
    global_batch: int = 1  # sequences per optimizer step
    zero: int = 1  # 0 DDP, 1 optimizer states, 2 + grads, 3 + params (FSDP)
    recompute: str = "none"  # none | selective (attention core) | full (whole layer)
    offload: str = "none"  # none | optimizer (ZeRO-Offload: Adam states + step on CPU)
    sequence_parallel: bool = True  # Megatron SP with TP > 1
    overlap_dp: bool = True  # DP collectives overlap backward / next forward

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def short(self) -> str:
        s = f"tp{self.tp} pp{self.pp}"
        if self.vpp > 1:
            s += f"v{self.vpp}"
        s += f" dp{self.dp}"
        if self.cp > 1:
            s += f" cp{self.cp}"
        if self.ep > 1:
            s += f" ep{self.ep}"
        s += f" mbs{self.micro_batch} z{self.zero}"
        if self.recompute != "none":
            s += f" rc-{self.recompute}"
        if self.offload != "none":
            s += " offload"
        return s


@dataclass(frozen=True)
class Cluster:
    name: str = "h100"
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100 SXM)
    compute_efficiency: float = 0.6  # achieved fraction of peak in matmul-heavy code (calibrate)
    comm_efficiency: float = 0.8  # achieved fraction of link bandwidth (calibrate)
    hbm_gb: float = 80.0
    hbm_gbps: float = 3350.0
    nvlink_gbps: float = 900.0  # spec, both directions summed
    inter_node_gbps: float = 50.0  # per GPU per direction (400 Gb/s InfiniBand NIC per GPU)
    intra_latency_us: float = 5.0  # per ring step
    inter_latency_us: float = 15.0
    gpus_per_node: int = 8
    pcie_gbps: float = 50.0  # host <-> GPU per direction (offload)
    cpu_adam_gparams_per_s: float = 1.0  # per GPU's share of host cores (offload)
    host_mem_gb: float = 2000.0  # per node (offload)
    overhead_gb: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation

    def __post_init__(self):
        for name in ("compute_efficiency", "comm_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Cluster.{name} must be in (0, 1], got {v}")
        for name in ("peak_tflops", "hbm_gb", "hbm_gbps", "nvlink_gbps", "inter_node_gbps",
                     "pcie_gbps", "cpu_adam_gparams_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Cluster.{name} must be > 0, got {getattr(self, name)}")
        if self.gpus_per_node < 1:
            raise ValueError(f"Cluster.gpus_per_node must be >= 1, got {self.gpus_per_node}")


MODEL_PRESETS = {
    # Llama-3-8B / 70B shapes.
    "8b": ModelSpec("llama-8b", 32, 4096, 32, 8, 14336, 128256, 8192),
    "70b": ModelSpec("llama-70b", 80, 8192, 64, 8, 28672, 128256, 8192),
    # 16 experts top-2 on an 8B-like trunk (expert = half the dense FFN).
    "moe16": ModelSpec("moe-16e", 32, 4096, 32, 8, 14336, 128256, 8192,
                       num_experts=16, top_k=2, expert_ffn=7168),
    # DeepSeekMoE-16B-like: 64 fine-grained experts top-6 + 2 shared, first layer dense.
    "moe64": ModelSpec("moe-64e", 28, 2048, 16, 16, 10944, 102400, 4096,
                       num_experts=64, top_k=6, expert_ffn=1408, shared_expert_ffn=2816,
                       dense_layers=1),
}
MODEL_PRESETS["moe"] = MODEL_PRESETS["moe64"]
DEFAULT_GLOBAL_BATCH = {"8b": 512, "70b": 512, "moe16": 512, "moe64": 1024, "moe": 1024}
CLUSTER_PRESETS = {"h100": Cluster()}


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


def ring_all_reduce_bytes(n: int, nbytes: float) -> float:
    """Bytes each rank sends in a ring all-reduce of an ``nbytes`` buffer: 2(n-1)/n * nbytes."""
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def ring_all_gather_bytes(n: int, nbytes: float) -> float:
    """Ring all-gather / reduce-scatter of a full buffer of ``nbytes``: (n-1)/n * nbytes."""
    return (n - 1) / n * nbytes if n > 1 else 0.0


def pipeline_bubble_fraction(pp: int, vpp: int, num_micro_batches: int) -> float:
    """Bubble time over ideal time for (interleaved) 1F1B: (p - 1) / (v * m)."""
    return (pp - 1) / (vpp * num_micro_batches)


@dataclass(frozen=True)
class _Group:
    size: int
    stride: int  # distance in global rank between consecutive members


def _ring_link(group: _Group, cluster: Cluster) -> tuple[float, float]:
    """(bandwidth bytes/s per direction, latency s per ring step) of a group's ring."""
    intra = cluster.nvlink_gbps / 2 * 1e9
    if group.size * group.stride <= cluster.gpus_per_node:
        return intra * cluster.comm_efficiency, cluster.intra_latency_us * 1e-6
    members_per_node = max(1, cluster.gpus_per_node // group.stride)
    bw = min(intra, members_per_node * cluster.inter_node_gbps * 1e9)
    return bw * cluster.comm_efficiency, cluster.inter_latency_us * 1e-6


def all_reduce_time(group: _Group, nbytes: float, cluster: Cluster, count: int = 1) -> float:
    """``nbytes`` in total, issued as ``count`` collectives (each pays the ring latency)."""
    if group.size <= 1:
        return 0.0
    bw, lat = _ring_link(group, cluster)
    return ring_all_reduce_bytes(group.size, nbytes) / bw + count * 2 * (group.size - 1) * lat


def all_gather_time(group: _Group, nbytes: float, cluster: Cluster, count: int = 1) -> float:
    """Also the time of a reduce-scatter of the same full buffer."""
    if group.size <= 1:
        return 0.0
    bw, lat = _ring_link(group, cluster)
    return ring_all_gather_bytes(group.size, nbytes) / bw + count * (group.size - 1) * lat


def all_to_all_time(group: _Group, nbytes: float, cluster: Cluster) -> float:
    """Each rank sends nbytes/n to every peer; on-node and off-node parts run in parallel."""
    n = group.size
    if n <= 1:
        return 0.0
    gpn = cluster.gpus_per_node
    on_node = min(n, max(1, gpn // group.stride)) if group.stride < gpn else 1
    intra_bw = cluster.nvlink_gbps / 2 * 1e9 * cluster.comm_efficiency
    inter_bw = cluster.inter_node_gbps * 1e9 * cluster.comm_efficiency
    t_intra = (on_node - 1) / n * nbytes / intra_bw
    t_inter = (n - on_node) / n * nbytes / inter_bw
    lat = cluster.inter_latency_us if n > on_node else cluster.intra_latency_us
    return max(t_intra, t_inter) + lat * 1e-6


def p2p_time(group: _Group, nbytes: float, cluster: Cluster) -> float:
    """One point-to-point send between neighbours of a group (PP stages, CP ring)."""
    if group.size <= 1:
        return 0.0
    if group.stride < cluster.gpus_per_node and group.size * group.stride <= cluster.gpus_per_node:
        bw, lat = cluster.nvlink_gbps / 2, cluster.intra_latency_us
    else:
        bw, lat = cluster.inter_node_gbps, cluster.inter_latency_us
    return nbytes / (bw * 1e9 * cluster.comm_efficiency) + lat * 1e-6


# ---------------------------------------------------------------------------------------------
# Legality
# ---------------------------------------------------------------------------------------------


def layout_problems(model: ModelSpec, layout: Layout) -> list[str]:
    """Every reason the layout cannot run this model (empty list = legal)."""
    p = []
    for name in ("tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "global_batch"):
        if getattr(layout, name) < 1:
            p.append(f"Layout.{name} must be >= 1, got {getattr(layout, name)}")
    if p:
        return p
    if layout.zero not in ZERO_STAGES:
        p.append(f"Layout.zero must be one of {ZERO_STAGES}, got {layout.zero}")
    if layout.recompute not in RECOMPUTE_MODES:
        p.append(f"Layout.recompute must be one of {RECOMPUTE_MODES}, got {layout.recompute!r}")
    if layout.offload not in OFFLOAD_MODES:
        p.append(f"Layout.offload must be one of {OFFLOAD_MODES}, got {layout.offload!r}")
    if layout.offload != "none" and layout.zero < 1:
        p.append("Layout.offload='optimizer' needs zero >= 1 (ZeRO-Offload shards the states)")
    t = layout.tp
    if model.n_heads % t or model.n_kv_heads % t:
        p.append(f"Layout.tp={t} must divide n_heads={model.n_heads} and n_kv_heads={model.n_kv_heads}")
    if model.ffn % t or (model.is_moe and (model.expert_ffn % t or model.shared_expert_ffn % t)):
        p.append(f"Layout.tp={t} must divide the MLP sizes")
    if model.n_layers % (layout.pp * layout.vpp):
        p.append(f"Layout.pp*vpp={layout.pp * layout.vpp} must divide n_layers={model.n_layers}")
    if layout.global_batch % (layout.dp * layout.micro_batch):
        p.append(f"Layout.global_batch={layout.global_batch} must be a multiple of "
                 f"dp*micro_batch={layout.dp * layout.micro_batch}")
    m = layout.num_micro_batches
    if layout.vpp > 1 and (layout.pp == 1 or m % layout.pp):
        p.append(f"Layout.vpp={layout.vpp} needs pp > 1 and micro-batches ({m}) divisible by pp={layout.pp}")
    if layout.cp > 1 and model.seq_len % (2 * layout.cp):
        p.append(f"Layout.cp={layout.cp}: seq_len={model.seq_len} must divide into 2*cp chunks")
    if layout.ep > 1 and not model.is_moe:
        p.append("Layout.ep > 1 needs an MoE model (num_experts > 0)")
    if model.is_moe and (model.num_experts % layout.ep or (layout.dp * layout.cp) % layout.ep):
        p.append(f"Layout.ep={layout.ep} must divide num_experts={model.num_experts} and dp*cp={layout.dp * layout.cp}")
    if layout.pp > 1 and layout.zero >= 2:
        p.append("Layout.zero >= 2 is not supported with pp > 1 (gradients are needed across micro-batches)")
    return p


def check_layout(model: ModelSpec, layout: Layout) -> None:
    problems = layout_problems(model, layout)
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter (ZeRO paper, mixed-precision Adam)."""

    param: float = 2.0
    grad: float = 2.0
    optim: float = 12.0  # fp32 master + Adam m + v


def zero_model_state_bytes(params: float, n_shards: int, zero: int, prec: Precision = Precision()) -> dict:
    """Params / grads / optimizer bytes per GPU for ``params`` elements sharded over ``n_shards``."""
    n = max(1, n_shards)
    return {
        "params": prec.param * params / (n if zero >= 3 else 1),
        "grads": prec.grad * params / (n if zero >= 2 else 1),
        "optimizer": prec.optim * params / (n if zero >= 1 else 1),
    }


@functools.lru_cache(maxsize=65536)
def activation_bytes_per_layer(model: ModelSpec, layer: int, micro_batch: int, seq_local: int,
                               tp: int, sequence_parallel: bool, recompute: str) -> float:
    """Activation bytes kept for backward by one layer and one micro-batch on one GPU.

    Korthikanti et al. 2022 give sbh(34 + 5as/h) for GPT (4h GeLU MLP, MHA, dropout, no
    flash attention); the terms below reduce to exactly that and generalise to GQA, SwiGLU,
    flash attention and MoE. With TP + sequence parallelism every term is split over t;
    without SP the norm inputs, dropout masks and the qkv/MLP inputs stay replicated.
    """
    s, b, h = seq_local, micro_batch, model.hidden
    sbh = s * b * h
    g = model.n_kv_heads / model.n_heads
    drop = 1.0 if model.dropout else 0.0
    if recompute == "full":  # only the layer input is kept (split over TP with SP)
        return BF16 * sbh / (tp if sequence_parallel else 1)
    # Attention: qkv input 2, Q 2, K+V 4g, output-projection input 2, dropout mask 1 (x sbh).
    attn_split = (2 + 4 * g + 2) * sbh
    attn_repl = (2 + drop) * sbh  # qkv input + projection dropout mask
    scores = 0.0
    if not model.flash_attention and recompute != "selective":
        scores = (5 if model.dropout else 2) * model.n_heads * s * s * b  # softmax (+mask, +dropout out)
    # MLP.
    if model.is_moe_layer(layer):
        k, m = model.top_k, model.mlp_matrices()
        inner = 2 * (m - 1) + 2  # bytes/elem of gate&up outputs (+ product) kept
        mlp_split = (k * (2 * h + inner * model.expert_ffn + 2 * h) + inner * model.shared_expert_ffn) * s * b
        mlp_split += 4 * model.num_experts * s * b  # fp32 router logits
    else:
        inner = 6 if model.gated_mlp else 4  # SwiGLU: gate, up, product; GeLU: input, output
        mlp_split = inner * model.ffn * s * b
    mlp_repl = (2 + drop) * sbh  # MLP input + dropout mask
    norms = 4 * sbh  # two norm inputs
    replicated = attn_repl + mlp_repl + norms
    split = attn_split + mlp_split + scores
    if sequence_parallel or tp == 1:
        return (replicated + split) / tp
    return replicated + split / tp


def _device_layers(model: ModelSpec, layout: Layout, device: int) -> tuple[int, ...]:
    """Layers on pipeline rank ``device`` (chunks of L/(p*v) assigned round-robin)."""
    return _layers_on_rank(model, layout.pp, layout.vpp, device)


@functools.lru_cache(maxsize=4096)
def _layers_on_rank(model: ModelSpec, pp: int, vpp: int, device: int) -> tuple[int, ...]:
    chunk = model.n_layers // (pp * vpp)
    return tuple(i for i in range(model.n_layers) if (i // chunk) % pp == device)


def _in_flight_chunks(layout: Layout, device: int) -> float:
    """Micro-batch chunks whose activations pipeline rank ``device`` holds at its peak."""
    p, v, m = layout.pp, layout.vpp, layout.num_micro_batches
    if v == 1:
        return min(m, p - device)  # 1F1B warm-up depth (a chunk = all the rank's layers)
    # Megatron interleaved warm-up: 2(p - d - 1) + (v - 1)p chunks, +1 in flight.
    return min(m * v, 2 * (p - device - 1) + (v - 1) * p + 1)


def _rank_params(model: ModelSpec, layout: Layout, device: int) -> tuple[float, float]:
    """(dense, expert) parameter elements held by one GPU of pipeline rank ``device``
    (after TP / EP sharding, before ZeRO). The first rank holds the embedding, the last the
    output head (both, once, if tied and pp == 1)."""
    return _rank_params_cached(model, layout.pp, layout.vpp, layout.tp, layout.ep, device)


@functools.lru_cache(maxsize=16384)
def _rank_params_cached(model: ModelSpec, pp: int, vpp: int, tp: int, ep: int, device: int) -> tuple[float, float]:
    layers = _layers_on_rank(model, pp, vpp, device)
    dense = sum(model.attn_params() + (model.moe_shared_params_per_layer() if model.is_moe_layer(i)
                                       else model.dense_mlp_params()) for i in layers)
    expert = sum(model.expert_params_per_layer() for i in layers if model.is_moe_layer(i))
    if device == 0:
        dense += model.vocab * model.hidden
    if device == pp - 1:
        dense += model.hidden  # final norm
        if not model.tie_embeddings or pp > 1:
            dense += model.vocab * model.hidden
    return dense / tp, expert / (tp * ep)


def memory_breakdown(model: ModelSpec, layout: Layout, cluster: Cluster,
                     prec: Precision = Precision()) -> dict:
    """Bytes per GPU on the worst pipeline rank (first or last), by category."""
    worst = None
    for device in sorted({0, layout.pp - 1}):
        layers = _device_layers(model, layout, device)
        dense_dev, expert_dev = _rank_params(model, layout, device)
        states = zero_model_state_bytes(dense_dev, layout.dp * layout.cp, layout.zero, prec)
        e_states = zero_model_state_bytes(expert_dev, layout.dp * layout.cp // layout.ep, layout.zero, prec)
        mem = {k: states[k] + e_states[k] for k in states}
        host_optimizer = 0.0
        if layout.offload == "optimizer":
            host_optimizer, mem["optimizer"] = mem["optimizer"], 0.0
        if layout.zero >= 3 and layers:  # two gathered layers (current + prefetch)
            mem["params"] += 2 * prec.param * (dense_dev + expert_dev) / len(layers)

        seq_local = model.seq_len // layout.cp
        per_chunk = [activation_bytes_per_layer(model, i, layout.micro_batch, seq_local, layout.tp,
                                                layout.sequence_parallel, layout.recompute) for i in layers]
        layers_per_chunk = max(1, len(layers) // layout.vpp)
        avg_layer = sum(per_chunk) / max(1, len(per_chunk))
        acts = _in_flight_chunks(layout, device) * layers_per_chunk * avg_layer
        if layout.cp > 1 and layout.recompute == "none":  # the other cp ranks' K,V, gathered and kept for backward
            gathered = BF16 * 2 * layout.micro_batch * (model.seq_len - seq_local) * model.kv_dim / layout.tp
            acts += _in_flight_chunks(layout, device) * layers_per_chunk * gathered
        if layout.recompute == "full" and layers:  # one layer rebuilt in full during backward
            acts += max(activation_bytes_per_layer(model, i, layout.micro_batch, seq_local, layout.tp,
                                                   layout.sequence_parallel, "none") for i in layers)
        mem["activations"] = acts
        mem["logits"] = (4.0 * layout.micro_batch * seq_local * model.vocab / layout.tp
                         if device == layout.pp - 1 else 0.0)  # fp32 logits for the loss
        mem["overhead"] = cluster.overhead_gb * 1e9
        mem["total"] = sum(mem.values())
        mem["host_optimizer"] = host_optimizer
        mem["pipeline_rank"] = device
        if worst is None or mem["total"] > worst["total"]:
            worst = mem
    return worst


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    model: ModelSpec
    layout: Layout
    cluster: Cluster
    step_time_s: float
    tokens_per_s: float
    mfu: float
    memory_gb: float
    fits: bool
    bubble_fraction: float
    breakdown: dict = field(default_factory=dict)  # seconds per step; sums to step_time_s
    memory: dict = field(default_factory=dict)  # GB per GPU
    dp_comm_total_s: float = 0.0  # DP collective time before overlap (breakdown has the exposed part)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.layout.n_gpus

    def to_dict(self) -> dict:
        return {
            "layout": dataclasses.asdict(self.layout),
            "layout_short": self.layout.short(),
            "n_gpus": self.layout.n_gpus,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "mfu": self.mfu,
            "memory_gb": self.memory_gb,
            "fits": self.fits,
            "bubble_fraction": self.bubble_fraction,
            "breakdown_s": self.breakdown,
            "memory_gb_breakdown": self.memory,
            "dp_comm_total_s": self.dp_comm_total_s,
        }


@functools.lru_cache(maxsize=4096)
def _rank_flops(model: ModelSpec, pp: int, vpp: int, device: int) -> tuple[float, float, int]:
    """(forward FLOPs per token of the rank's layers, of which attention core, MoE layers)."""
    fwd = core = 0.0
    moe = 0
    for i in _layers_on_rank(model, pp, vpp, device):
        f = model.layer_flops_per_token(i)
        fwd += sum(f.values())
        core += f["core"]
        moe += model.is_moe_layer(i)
    return fwd, core, moe


def _micro_batch_stage_times(model: ModelSpec, layout: Layout, cluster: Cluster, device: int) -> dict:
    """Seconds one pipeline rank spends on one micro-batch (all its chunks, fwd + bwd)."""
    t, cp = layout.tp, layout.cp
    tokens = layout.micro_batch * model.seq_len  # whole sequences; split over tp*cp below
    flops_per_s = cluster.peak_tflops * 1e12 * cluster.compute_efficiency
    layers = _device_layers(model, layout, device)

    fwd, core_fwd, moe_layers = _rank_flops(model, layout.pp, layout.vpp, device)
    recompute = {"none": 0.0, "selective": core_fwd, "full": fwd}[layout.recompute]
    if device == layout.pp - 1:
        fwd += model.head_flops_per_token()
    scale = tokens / (t * cp) / flops_per_s
    compute = 3 * fwd * scale  # fwd + 2x for backward
    recompute_s = recompute * scale

    seq_local = model.seq_len // cp
    act_bytes = BF16 * layout.micro_batch * seq_local * model.hidden  # one full activation
    tp_group = _Group(t, 1)
    n_ar = 4 + (2 if layout.recompute == "full" else 0)  # 2 fwd + 2 bwd (+2 re-run fwd)
    tp_s = len(layers) * n_ar * all_reduce_time(tp_group, act_bytes, cluster)

    ep_s = 0.0
    if moe_layers and layout.ep > 1:
        routed = act_bytes * model.top_k / (t if layout.sequence_parallel else 1)
        n_a2a = 4 + (2 if layout.recompute == "full" else 0)  # dispatch+combine, fwd and bwd
        ep_s = moe_layers * n_a2a * all_to_all_time(_Group(layout.ep, t * cp), routed, cluster)

    cp_s = 0.0
    if cp > 1:  # parallel/context_parallel.py: all-gather of the whole sequence's K,V over cp before each
        # attention (again where the core is recomputed), reduce-scatter of dK,dV in backward; exposed
        kv_bytes = BF16 * 2 * layout.micro_batch * model.seq_len * model.kv_dim / t
        n_coll = 2 + (layout.recompute != "none")
        cp_s = len(layers) * n_coll * all_gather_time(_Group(cp, t), kv_bytes, cluster)

    pp_s = 0.0
    if layout.pp > 1:  # send activations forward and gradients back, once per chunk
        p2p_bytes = act_bytes / (t if layout.sequence_parallel else 1)
        pp_s = 2 * layout.vpp * p2p_time(_Group(layout.pp, t * cp * layout.dp), p2p_bytes, cluster)

    return {"compute": compute, "recompute": recompute_s, "tp_comm": tp_s, "ep_comm": ep_s,
            "cp_comm": cp_s, "pp_p2p": pp_s}


def _dp_times(model: ModelSpec, layout: Layout, cluster: Cluster, mb: dict, prec: Precision) -> tuple[float, float]:
    """(exposed, total) data-parallel communication seconds per step."""
    mem_dense, mem_expert = _device_param_split(model, layout)
    m, z = layout.num_micro_batches, layout.zero
    dense = _Group(layout.dp * layout.cp, layout.tp)
    expert = _Group(layout.dp * layout.cp // layout.ep, layout.tp * layout.ep)

    # ZeRO-3 gathers / reduces layer by layer; the others use buckets of DP_BUCKET_PARAMS.
    n_layers = len(_device_layers(model, layout, 0)) + 1  # + embedding / head

    def costs(group: _Group, params: float) -> tuple[float, float, float]:
        count = n_layers if z >= 3 else max(1, math.ceil(params / DP_BUCKET_PARAMS))
        grad_rs = all_gather_time(group, prec.grad * params, cluster, count)  # RS = AG cost
        grad_ar = all_reduce_time(group, prec.grad * params, cluster, count)
        param_ag = all_gather_time(group, prec.param * params, cluster, count)
        return grad_rs, grad_ar, param_ag

    fwd_mb = (mb["compute"] / 3 + mb["tp_comm"] / 2)
    bwd_mb = (2 * mb["compute"] / 3 + mb["recompute"] + mb["tp_comm"] / 2)
    # Dense and expert groups share the links and the same overlap window: sum, then overlap.
    rs = ar = ag = 0.0
    for group, params in ((dense, mem_dense), (expert, mem_expert)):
        if group.size > 1 and params > 0:
            g_rs, g_ar, g_ag = costs(group, params)
            rs, ar, ag = rs + g_rs, ar + g_ar, ag + g_ag
    ov = layout.overlap_dp
    if z == 0:
        total = ar
        exposed = max(0.0, ar - bwd_mb) if ov else ar
    elif z == 1:
        total = rs + ag
        exposed = max(0.0, rs - bwd_mb) + max(0.0, ag - fwd_mb) if ov else total
    elif z == 2:  # gradients reduce-scattered every micro-batch
        total = m * rs + ag
        exposed = m * max(0.0, rs - bwd_mb) + max(0.0, ag - fwd_mb) if ov else total
    else:  # FSDP: gather params for fwd and bwd, reduce-scatter grads, every micro-batch
        total = m * (2 * ag + rs)
        exposed = m * max(0.0, 2 * ag + rs - (fwd_mb + bwd_mb)) if ov else total
    return exposed, total


def _device_param_split(model: ModelSpec, layout: Layout) -> tuple[float, float]:
    """(dense, expert) parameters per GPU on the pipeline rank holding the most."""
    return max((_rank_params(model, layout, d) for d in sorted({0, layout.pp - 1})), key=sum)


def predict(model: ModelSpec, layout: Layout, cluster: Cluster = Cluster(),
            prec: Precision = Precision()) -> Prediction:
    """Step time, throughput and memory of one layout. Raises ValueError if illegal."""
    check_layout(model, layout)
    m, p, v = layout.num_micro_batches, layout.pp, layout.vpp

    per_device = [_micro_batch_stage_times(model, layout, cluster, d) for d in sorted({0, p - 1})]
    mb = max(per_device, key=lambda d: sum(d.values()))  # slowest stage sets the pace
    t_mb = sum(mb.values())
    bubble_frac = pipeline_bubble_fraction(p, v, m)
    breakdown = {k: m * val for k, val in mb.items()}
    breakdown["pp_bubble"] = t_mb * (p - 1) / v

    dp_exposed, dp_total = _dp_times(model, layout, cluster, mb, prec)
    breakdown["dp_comm"] = dp_exposed

    dense, expert = _device_param_split(model, layout)
    shard = dense / (layout.dp * layout.cp) + expert / (layout.dp * layout.cp // layout.ep)
    if layout.zero == 0:
        shard = dense + expert
    if layout.offload == "optimizer":  # grads down, params up over PCIe; Adam on the CPU
        breakdown["optimizer"] = shard / (cluster.cpu_adam_gparams_per_s * 1e9)
        breakdown["offload_pcie"] = shard * (prec.grad + prec.param) / (cluster.pcie_gbps * 1e9)
    else:  # Adam is memory bound: ~30 bytes read+written per parameter
        breakdown["optimizer"] = shard * 30.0 / (cluster.hbm_gbps * 1e9)
        breakdown["offload_pcie"] = 0.0

    step = sum(breakdown.values())
    tokens = layout.global_batch * model.seq_len
    mfu = model.model_flops_per_token() * tokens / (layout.n_gpus * cluster.peak_tflops * 1e12 * step)
    mem = memory_breakdown(model, layout, cluster, prec)
    mem_gb = {k: (val / 1e9 if k != "pipeline_rank" else val) for k, val in mem.items()}
    host_ok = mem["host_optimizer"] * cluster.gpus_per_node <= cluster.host_mem_gb * 1e9
    return Prediction(model, layout, cluster, step, tokens / step, mfu, mem["total"] / 1e9,
                      mem["total"] <= cluster.hbm_gb * 1e9 and host_ok, bubble_frac, breakdown, mem_gb,
                      dp_comm_total_s=dp_total)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def candidate_layouts(model: ModelSpec, n_gpus: int, global_batch: int, *,
                      micro_batches: Sequence[int] = (1, 2, 4, 8),
                      recompute: Sequence[str] = RECOMPUTE_MODES,
                      zero_stages: Sequence[int] = (1, 2, 3),
                      vpps: Sequence[int] = (1, 2, 4),
                      max_cp: int = 16,
                      offload: Sequence[str] = ("none",)) -> Iterable[Layout]:
    """Every legal layout of ``n_gpus`` for this model and batch (Megatron-style rules)."""
    for tp in _powers_of_two_upto(n_gpus):
        if n_gpus % tp:
            continue
        rest_tp = n_gpus // tp
        for pp in _divisors(rest_tp):
            if model.n_layers % pp:
                continue
            rest_pp = rest_tp // pp
            for cp in _powers_of_two_upto(min(rest_pp, max_cp)):
                if rest_pp % cp:
                    continue
                dp = rest_pp // cp
                eps = [1]
                if model.is_moe:
                    eps = [e for e in _powers_of_two_upto(dp * cp)
                           if model.num_experts % e == 0 and (dp * cp) % e == 0]
                for mbs in micro_batches:
                    if global_batch % (dp * mbs):
                        continue
                    for vpp in (vpps if pp > 1 else (1,)):
                        for ep in eps:
                            for zero in zero_stages:
                                for rc in recompute:
                                    for off in offload:
                                        layout = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, vpp=vpp,
                                                        micro_batch=mbs, global_batch=global_batch,
                                                        zero=zero, recompute=rc, offload=off)
                                        if not layout_problems(model, layout):
                                            yield layout


def rank_layouts(model: ModelSpec, n_gpus: int, cluster: Cluster, global_batch: int,
                 **search) -> list[Prediction]:
    """Predictions of every legal layout that fits in memory, fastest first."""
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    preds = []
    for layout in candidate_layouts(model, n_gpus, global_batch, **search):
        # Memory first: it is cheaper than the time model and prunes most candidates.
        mem = memory_breakdown(model, layout, cluster)
        if mem["total"] > cluster.hbm_gb * 1e9:
            continue
        pred = predict(model, layout, cluster)
        if pred.fits:
            preds.append(pred)
    # Ties (equal time) go to less model parallelism: simpler and fewer failure points.
    preds.sort(key=lambda p: (round(p.step_time_s, 12), p.layout.tp * p.layout.pp * p.layout.cp,
                              p.layout.zero, RECOMPUTE_MODES.index(p.layout.recompute)))
    return preds


def recommend(model: ModelSpec, n_gpus: int, cluster: Cluster = Cluster(),
              global_batch: Optional[int] = None, **search) -> Prediction:
    """The fastest legal layout that fits in memory. Raises ValueError if none does."""
    if global_batch is None:
        global_batch = n_gpus
    ranked = rank_layouts(model, n_gpus, cluster, global_batch, **search)
    if not ranked:
        raise ValueError(f"no legal layout of {n_gpus} GPUs fits {model.name} with global_batch="
                         f"{global_batch} in {cluster.hbm_gb} GB (try more GPUs, offload, or a "
                         f"global_batch divisible by more data-parallel sizes)")
    return ranked[0]


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    model: ModelSpec
    layout: Layout
    step_time_s: float
    label: str = ""


CALIBRATABLE = ("compute_efficiency", "comm_efficiency")


def calibrate(measurements: Sequence[Measurement], cluster: Cluster = Cluster(),
              fit: Optional[Sequence[str]] = None, iters: int = 50) -> dict:
    """Fit efficiency factor(s) to measured step times (least squares on relative error).

    ``fit`` defaults to both efficiencies when there are >= 2 measurements, else compute
    only. Levenberg-Marquardt in log space (the model is ~1/efficiency, but overlap terms
    make it non-linear). Returns the fitted cluster and predicted-vs-measured rows.
    """
    import numpy as np

    if not measurements:
        raise ValueError("measurements must contain at least one Measurement")
    for m in measurements:
        if not m.step_time_s > 0:
            raise ValueError(f"Measurement.step_time_s must be > 0, got {m.step_time_s} ({m.label})")
        check_layout(m.model, m.layout)
    if fit is None:
        fit = CALIBRATABLE if len(measurements) >= 2 else ("compute_efficiency",)
    fit = tuple(fit)
    bad = [f for f in fit if f not in CALIBRATABLE]
    if bad or not fit:
        raise ValueError(f"fit must name some of {CALIBRATABLE}, got {fit}")
    measured = np.array([m.step_time_s for m in measurements])

    def residuals(logx) -> "np.ndarray":
        vals = {name: float(min(1.0, math.exp(x))) for name, x in zip(fit, logx)}
        c = dataclasses.replace(cluster, **vals)
        pred = np.array([predict(m.model, m.layout, c).step_time_s for m in measurements])
        return pred / measured - 1.0

    x = np.log([getattr(cluster, f) for f in fit])
    r = residuals(x)
    lam = 1e-3
    for _ in range(iters):
        jac = np.empty((len(r), len(x)))
        for j in range(len(x)):  # forward differences
            dx = np.zeros_like(x)
            dx[j] = 1e-6
            jac[:, j] = (residuals(x + dx) - r) / 1e-6
        jtj, jtr = jac.T @ jac, jac.T @ r
        step = -np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), jtr)
        x_new = np.minimum(x + step, 0.0)  # efficiency <= 1
        r_new = residuals(x_new)
        if r_new @ r_new < r @ r:
            x, r, lam = x_new, r_new, lam / 10
            if np.max(np.abs(step)) < 1e-10:
                break
        else:
            lam *= 10
            if lam > 1e10:
                break
    fitted = dataclasses.replace(cluster, **{f: float(min(1.0, math.exp(v))) for f, v in zip(fit, x)})
    rows = []
    for m in measurements:
        before = predict(m.model, m.layout, cluster).step_time_s
        after = predict(m.model, m.layout, fitted).step_time_s
        rows.append({"label": m.label or f"{m.model.name} {m.layout.short()}",
                     "measured_s": m.step_time_s, "predicted_before_s": before,
                     "predicted_s": after, "rel_error": after / m.step_time_s - 1.0})
    rms = math.sqrt(sum(row["rel_error"] ** 2 for row in rows) / len(rows))
    return {"cluster": fitted, "fitted": {f: getattr(fitted, f) for f in fit}, "rows": rows,
            "rms_rel_error": rms}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_gpu_counts(text: str) -> list[int]:
    """'8..1024' (powers of two from 8 to 1024), '8,16,64', or '64'."""
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split(".."))
            if lo < 1 or hi < lo:
                raise ValueError
            out, k = [], lo
            while k <= hi:
                out.append(k)
                k *= 2
            return out
        counts = [int(x) for x in text.split(",")]
        if any(c < 1 for c in counts):
            raise ValueError
        return counts
    except ValueError:
        raise ValueError(f"--gpus must look like '8..1024' or '8,16,64' with positive counts, got {text!r}") from None


def model_from_dict(d) -> ModelSpec:
    if isinstance(d, str):
        if d not in MODEL_PRESETS:
            raise ValueError(f"model preset {d!r} unknown; choose from {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[d]
    return ModelSpec(**d)


def load_measurements(path: str) -> list[Measurement]:
    """JSON list of {"model": preset-or-dict, "layout": {...}, "step_time_s": s, "label": ...}."""
    with open(path) as f:
        items = json.load(f)
    out = []
    for i, it in enumerate(items):
        try:
            out.append(Measurement(model_from_dict(it["model"]), Layout(**it["layout"]),
                                   float(it["step_time_s"]), it.get("label", "")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: measurement {i} needs model, layout, step_time_s ({e})") from None
    return out


def _fmt_row(pred: Prediction, base_per_gpu: float) -> str:
    b = pred.breakdown
    comm = b["tp_comm"] + b["ep_comm"] + b["cp_comm"] + b["pp_p2p"] + b["dp_comm"]
    return (f"{pred.layout.n_gpus:>6} {pred.layout.short():<44} {pred.step_time_s:>8.3f} "
            f"{pred.tokens_per_s:>12.4g} {pred.tokens_per_s_per_gpu:>9.0f} {100 * pred.mfu:>5.1f} "
            f"{100 * pred.tokens_per_s_per_gpu / base_per_gpu:>6.1f} {pred.memory_gb:>6.1f} "
            f"{100 * comm / pred.step_time_s:>5.1f} {100 * b['pp_bubble'] / pred.step_time_s:>6.1f}")


HEADER = (f"{'gpus':>6} {'layout':<44} {'step_s':>8} {'tokens/s':>12} {'tok/s/gpu':>9} {'MFU%':>5} "
          f"{'scale%':>6} {'mem_GB':>6} {'comm%':>5} {'bubble%':>7}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsetron.parallel.perf_model",
                                 description="Analytic (modelled, not measured) scaling predictions.")
    ap.add_argument("--model", default="8b", help=f"comma list of presets: {sorted(MODEL_PRESETS)}")
    ap.add_argument("--gpus", default="8..1024", help="'8..1024' (powers of 2) or '8,16,64'")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: preset)")
    ap.add_argument("--cluster", default="h100", choices=sorted(CLUSTER_PRESETS))
    ap.add_argument("--compute-efficiency", type=float, default=None)
    ap.add_argument("--comm-efficiency", type=float, default=None)
    ap.add_argument("--top", type=int, default=1, help="layouts shown per GPU count")
    ap.add_argument("--offload", action="store_true", help="also consider optimizer offload")
    ap.add_argument("--json", default=None, help="write results here (e.g. benchmarks/results/scaling_model.json)")
    ap.add_argument("--calibrate", default=None, metavar="MEASUREMENTS.json",
                    help="fit efficiencies to measured step times first, then predict with them")
    args = ap.parse_args(argv)

    try:
        names = [n.strip() for n in args.model.split(",") if n.strip()]
        models = {n: model_from_dict(n) for n in names}
        counts = parse_gpu_counts(args.gpus)
        if args.top < 1:
            raise ValueError(f"--top must be >= 1, got {args.top}")
        overrides = {k: v for k, v in (("compute_efficiency", args.compute_efficiency),
                                       ("comm_efficiency", args.comm_efficiency)) if v is not None}
        cluster = dataclasses.replace(CLUSTER_PRESETS[args.cluster], **overrides)
    except (ValueError, TypeError) as e:
        ap.error(str(e))

    report = {"kind": "modelled",
              "warning": "ANALYTIC MODEL OUTPUT (sparsetron/parallel/perf_model.py), NOT MEASURED. "
                         "Efficiencies are assumptions unless 'calibration' is present.",
              "cluster": dataclasses.asdict(cluster), "models": {}}
    if args.calibrate:
        result = calibrate(load_measurements(args.calibrate), cluster)
        cluster = result["cluster"]
        report["cluster"] = dataclasses.asdict(cluster)
        report["calibration"] = {"fitted": result["fitted"], "rows": result["rows"],
                                 "rms_rel_error": result["rms_rel_error"]}
        print(f"calibrated {result['fitted']} (rms relative error {100 * result['rms_rel_error']:.1f}%)")
        for row in result["rows"]:
            print(f"  {row['label']:<50} measured {row['measured_s']:.3f}s  predicted {row['predicted_s']:.3f}s"
                  f"  ({100 * row['rel_error']:+.1f}%)")

    search = {"offload": ("none", "optimizer")} if args.offload else {}
    for name, model in models.items():
        gb = args.global_batch or DEFAULT_GLOBAL_BATCH.get(name, 512)
        print(f"\n{model.name}: {model.total_params() / 1e9:.1f}B params ({model.active_params() / 1e9:.1f}B active), "
              f"seq {model.seq_len}, global batch {gb} seqs, cluster {cluster.name} "
              f"(compute eff {cluster.compute_efficiency:.2f}, comm eff {cluster.comm_efficiency:.2f}) [MODELLED]")
        print(HEADER)
        rows, base = [], None
        for n in counts:
            ranked = rank_layouts(model, n, cluster, gb, **search)
            if not ranked:
                print(f"{n:>6} no legal layout fits")
                rows.append({"n_gpus": n, "fits": False})
                continue
            base = base or ranked[0].tokens_per_s_per_gpu
            for pred in ranked[: args.top]:
                print(_fmt_row(pred, base))
            best = ranked[0].to_dict()
            best["scaling_efficiency"] = ranked[0].tokens_per_s_per_gpu / base
            rows.append(best)
        report["models"][name] = {"spec": dataclasses.asdict(model), "global_batch": gb,
                                  "total_params": model.total_params(),
                                  "active_params": model.active_params(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json} (modelled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
