"""AdamW with decoupled weight decay on matrices only, and the warmup + decay schedule."""

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # parameters built under deepspeed.zero.Init are flat; ds_shape keeps their real shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(cfg.fused) and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg, max_steps: int) -> float:
    """The learning rate of update number k = step + 1 (step is 0-based) out of T = max_steps, with
    W = warmup_steps: k <= W warms up linearly, lr * k / W (the W-th update is the one at the peak);
    after warmup the k-th update decays with progress (k - W) / (T - W), so the last update (k = T)
    lands exactly on the floor lr * min_lr_ratio. Without warmup the first update is the peak one:
    progress (k - 1) / (T - 1). "constant" keeps the peak after warmup."""
    k, warmup = step + 1, cfg.warmup_steps
    if k <= warmup:
        return cfg.lr * k / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if warmup:
        progress = (k - warmup) / max(max_steps - warmup, 1)
    else:
        progress = (k - 1) / max(max_steps - 1, 1)
    progress = min(progress, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
