"""Throughput, MFU, memory, and where metrics go (metrics.jsonl, wandb, progress bar, loss PNG)."""

import json
import os
import resource
import sys
from typing import Dict, Optional

import torch

# Datasheet dense bf16 peaks (FLOP/s), matched against torch.cuda.get_device_name().
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16.items():
        if key in name:
            return flops
    return None


def flops_per_token(cfg, seq_len: int, num_params: int, embedding_params: int) -> float:
    """PaLM appendix B: 6 N (N without the embedding table) + 12 L d S for attention (training)."""
    return 6.0 * (num_params - embedding_params) + 12.0 * cfg.n_layers * cfg.dim * seq_len


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
    """Rank 0 writes metrics.jsonl (appending, so a resumed run continues it), wandb, and a tqdm bar."""

    def __init__(self, cfg, run_dir: str, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        self.bar = None
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
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr)

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.bar is None:
            if record["kind"] != "train" or record["step"] % 10 == 0:
                print(_line(record), file=sys.stderr, flush=True)
        elif record["kind"] == "train":
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
        else:
            self.bar.write(_line(record), file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _line(record: Dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


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
    token, tokens dropped/added by token rounding, balance and z losses; per-expert loads on request."""
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
        for key in ("experts_per_token", "tokens_dropped", "tokens_added", "balance_loss", "z_loss"):
            if key in stats:
                out[f"moe/{layer}/{key}"] = float(stats[key])
    return out
