"""AdamW with decoupled weight decay on matrices only, and the warmup + decay schedule.

With the optimizer state on the host (ZeRO offload) the update is DeepSpeed's SIMD CPU Adam by default
(optim.offload_impl); its C++ op is built once on first use, with a notice, or refused in one line."""

import math
import os

import torch


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device, host_offload: bool = False,
                    announce=print) -> torch.optim.Optimizer:
    """`host_offload`: ZeRO keeps the state on the host; then cfg.offload_impl picks the update."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # parameters built under deepspeed.zero.Init are flat; ds_shape keeps their real shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if host_offload and cfg.offload_impl == "deepspeed_cpu_adam":
        load_cpu_adam_op(announce)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        # adamw_mode: decoupled weight decay, the same update as torch.optim.AdamW
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, adamw_mode=True)
    fused = bool(cfg.fused) and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def cpu_adam_op_cached() -> bool:
    """Whether DeepSpeed's cpu_adam op loads without compiling: built into the install
    (DS_BUILD_CPU_ADAM=1) or already JIT-built in torch's extension cache."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from torch.utils.cpp_extension import _get_build_directory  # torch's JIT extension cache

    if installed_ops.get("cpu_adam", False) and accelerator_name == get_accelerator()._name:
        return True
    try:
        return os.path.isfile(os.path.join(_get_build_directory("cpu_adam", verbose=False), "cpu_adam.so"))
    except Exception:  # noqa: BLE001 -- a private torch helper; unknown means "say a build may come"
        return False


def load_cpu_adam_op(announce=print):
    """DeepSpeed's cpu_adam op, built now if it has to be (one notice first); one clear error naming
    the switch to torch AdamW when it cannot be built. Never a silent fallback."""
    from sparsetron.configs.schema.validate import ConfigError

    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builder = CPUAdamBuilder()
        if not cpu_adam_op_cached() and announce is not None:
            announce("sparsetron: building DeepSpeed's CPU Adam op (one-off C++ compile, about a minute; cached "
                     "in torch's extension dir; optim.offload_impl=torch skips it)")
        return builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001 -- compiler, ninja, headers: all end in the same advice
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ConfigError("optim.offload_impl", f"DeepSpeed's CPU Adam op cannot be built here ({reason}); set "
                          f"optim.offload_impl=torch to run torch AdamW on the host instead") from None


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
