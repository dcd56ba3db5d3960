"""Throughput, MFU, memory, and where metrics go (metrics.jsonl, wandb, TensorBoard, progress bar or
plain log lines, loss PNG)."""

import json
import os
import resource
import sys
import time
from typing import Dict, Optional

import torch

from sparsetron.configs.schema.model import head_dim_of

# Datasheet dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, per GPU, matched in this order as
# case-insensitive substrings of torch.cuda.get_device_name(): the more specific names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),  # NVIDIA H100 datasheet: PCIe, BF16 1,513 TFLOPS with sparsity -> 756 dense
    ("H100 NVL", 835e12),  # H100 datasheet: NVL, 1,671 with sparsity -> 835 dense
    ("H200 NVL", 835e12),  # H200 datasheet: H200 NVL, 1,671 with sparsity -> 835 dense
    ("GH200", 989e12),  # GH200 datasheet: the Hopper GPU at H100/H200 SXM rates, 989 dense
    ("H100", 989e12),  # H100 datasheet: SXM, 1,979 with sparsity -> 989 dense ("H100 80GB HBM3" is SXM)
    ("H200", 989e12),  # H200 datasheet: SXM, 1,979 with sparsity -> 989 dense
    ("H800", 989e12),  # H800 SXM: the H100 SXM compute rates
    ("A100", 312e12),  # A100 datasheet: 40 GB and 80 GB, SXM and PCIe, BF16 312 dense (624 sparse)
    ("A800", 312e12),  # A800: the A100 compute rates
    ("GB200", 2500e12),  # GB200 NVL72 datasheet: per GPU 5 PFLOPS with sparsity -> 2,500 dense
    ("B200", 2250e12),  # HGX B200 datasheet: per GPU 4.5 PFLOPS with sparsity -> 2,250 dense
    ("L40S", 362e12),  # L40S datasheet: BF16 362.05 dense (733 with sparsity)
    ("MI300X", 1307e12),  # AMD Instinct MI300X datasheet: BF16 1,307.4 dense (2,614.9 with sparsity)
    ("MI325X", 1307e12),  # AMD Instinct MI325X datasheet: same compute as MI300X, 1,307.4 dense
)


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """The per-device peak that MFU is against: `override_tflops` (logging.peak_tflops) when given, on any
    device; else the datasheet bf16 peak of a known GPU; else None (no MFU: CPUs, unknown GPUs)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


def gpu_peak_flops(name: str) -> Optional[float]:
    lowered = name.lower()
    for key, flops in PEAK_BF16:
        if key.lower() in lowered:
            return flops
    return None


def flops_per_token(cfg, seq_len: int, num_params: int, embedding_params: int) -> float:
    """PaLM appendix B: 6 N (N without the embedding table) + 12 L H d_head S for attention (training);
    H d_head is the model width unless the config sets its own head_dim."""
    return 6.0 * (num_params - embedding_params) + 12.0 * cfg.n_layers * cfg.n_heads * head_dim_of(cfg) * seq_len


def parameter_counts(model_cfg, attn_cfg=None, moe_cfg=None) -> Dict[str, int]:
    """Whole-model counts from the config (a meta-device model: no memory, right under any sharding):
    total, embedding table, and active per token (MoE: only top_k of num_experts experts run)."""
    from .model import Llama

    with torch.device("meta"):
        model = Llama(model_cfg, attn_cfg, moe_cfg)
    total = model.num_params()
    inactive = 0
    if model_cfg.mlp == "moe":
        experts = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3)  # stacked (E, out, in)
        inactive = int(experts * (1 - moe_cfg.top_k / moe_cfg.num_experts))
    return {"total": total, "embedding": model.embed.weight.numel(), "active": total - inactive}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsSink:
    """Rank 0 writes metrics.jsonl (appending, so a resumed run continues it), wandb and TensorBoard
    (logging.tensorboard; the same scalars), and shows progress: a tqdm bar when stderr is a terminal,
    else (SLURM .out files, pipes) one plain line per logged step -- no carriage returns."""

    def __init__(self, cfg, run_dir: str, enabled: bool, start_step: int, total_steps: int, stream=None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.stream = stream if stream is not None else sys.stderr
        self.wandb = self.tensorboard = self.bar = None
        self.eta = EtaClock(total_steps)
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(self.path, "a")
        if cfg.logging.wandb.mode != "disabled":
            import wandb

            w = cfg.logging.wandb
            self.wandb = wandb.init(
                project=w.project, entity=w.entity, group=w.group, name=cfg.name, mode=w.mode,
                dir=run_dir, config=_plain(cfg), resume="allow", id=_wandb_id(run_dir),
            )
        if cfg.logging.get("tensorboard", False):
            self.tensorboard = tensorboard_writer(os.path.join(run_dir, "tensorboard"))
        if cfg.logging.progress_bar and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=self.stream)

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = scalar_metrics(record)
        if self.wandb is not None:
            lists = {f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, list)}
            self.wandb.log({**scalars, **lists}, step=record["step"])
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, global_step=record["step"])
            self.tensorboard.flush()  # a killed job keeps what it logged
        train = record["kind"] == "train"
        eta = self.eta.update(record["step"]) if train else None
        if self.bar is None:
            print(progress_line(record, self.eta.total, eta), file=self.stream, flush=True)
        elif train:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
        else:
            self.bar.write(progress_line(record, self.eta.total), file=self.stream)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def tensorboard_writer(log_dir: str):
    """torch's SummaryWriter (event files under <run dir>/tensorboard). The tensorboard package is an
    optional extra: asking for it without the package is a one-line config error, before any step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from sparsetron.configs.schema.validate import ConfigError

        raise ConfigError("logging.tensorboard", TENSORBOARD_MISSING) from None
    return SummaryWriter(log_dir=log_dir)


TENSORBOARD_MISSING = "needs the tensorboard package: pip install tensorboard (or pip install 'sparsetron[tensorboard]')"


def scalar_metrics(record: Dict) -> Dict[str, float]:
    """The numbers of one record as '<kind>/<name>' (train/loss, val/loss, train/mfu ...): what wandb and
    TensorBoard both get, so a val loss never overwrites the train loss of the same step."""
    return {f"{record['kind']}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class EtaClock:
    """Time left from the wall-clock rate since the first logged train step (the first one includes
    compilation and warm-up, so it only starts the clock; checkpoints and evals between are counted)."""

    def __init__(self, total_steps: int, clock=time.monotonic):
        self.total, self.clock = total_steps, clock
        self._first = None

    def update(self, step: int) -> Optional[float]:
        now = self.clock()
        if self._first is None or step <= self._first[0]:  # first record, or a restart of the count
            self._first = (step, now)
            return None
        first_step, first_time = self._first
        return (now - first_time) / (step - first_step) * max(self.total - step, 0)


def progress_line(record: Dict, total_steps: int, eta_s: Optional[float] = None) -> str:
    """One grep-friendly line: step=40/300 loss=5.123 lr=1.20e-03 tok/s=265.3k mfu=15.3% mem=7.70GiB ..."""
    if record["kind"] != "train":
        extra = [f"{k}={_short(v)}" for k, v in record.items() if k not in ("kind", "step")]
        return " ".join([f"{record['kind']} step={record['step']}/{total_steps}", *extra])
    parts = [f"step={record['step']}/{total_steps}", f"loss={record['loss']:.4f}"]
    if "lr" in record:
        parts.append(f"lr={record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"tok/s={_si(record['tokens_per_s'])}")
    if "mfu" in record:
        parts.append(f"mfu={100 * record['mfu']:.1f}%")
    if "mem_gib" in record:
        parts.append(f"mem={record['mem_gib']:.2f}GiB")
    if "step_time_s" in record:
        parts.append(f"step_time={record['step_time_s']:.3f}s")
    if eta_s is not None:
        parts.append(f"eta={_duration(eta_s)}")
    return " ".join(parts)


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.1f}"


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _wandb_id(run_dir: str) -> str:
    """One wandb run per run directory, so a resumed job continues the same curve."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if not os.path.exists(path):
        import uuid

        with open(path, "w") as f:
            f.write(uuid.uuid4().hex[:12])
    with open(path) as f:
        return f.read().strip()


def read_metrics(run_dir: str) -> Dict[str, Dict[int, dict]]:
    """The last record of each (kind, step): a resumed run's rewrites replace the killed run's."""
    out: Dict[str, Dict[int, dict]] = {"train": {}, "val": {}}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["kind"], {})[r["step"]] = r
    return out


def plot_losses(run_dir: str) -> Optional[str]:
    try:
        import matplotlib
    except ImportError:  # a trimmed image (e.g. a GPU container): the metrics file has the same data
        print("sparsetron: matplotlib is not installed; no loss.png", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("val", "o-")):
        steps = sorted(m.get(kind, {}))
        if steps:
            ax.plot(steps, [m[kind][s]["loss"] for s in steps], style, label=f"{kind} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def routing_metrics(model, with_loads: bool = False) -> Dict[str, object]:
    """MoE routing of the last forward, per layer: load imbalance (max/mean expert load), experts per
    token, tokens dropped/added by token rounding or capacity, the capacity's dropped fractions (assignments,
    whole tokens), balance and z losses; per-expert loads on request."""
    out: Dict[str, object] = {}
    for name, module in model.named_modules():
        stats = getattr(module, "last_stats", None)
        if not stats:
            continue
        layer = name.replace("layers.", "L").replace(".mlp", "")
        load = stats.get("expert_load")
        if load is not None:
            load = load.float()
            out[f"moe/{layer}/max_over_mean_load"] = (load.max() / load.mean().clamp_min(1e-9)).item()
            if with_loads:
                out[f"moe/{layer}/expert_load"] = [int(v) for v in load.tolist()]
        for key in ("experts_per_token", "tokens_dropped", "tokens_added", "balance_loss", "z_loss",
                    "dropped_assignment_fraction", "dropped_token_fraction"):  # the last two: moe.capacity_factor
            if key in stats:
                out[f"moe/{layer}/{key}"] = float(stats[key])
    return out
