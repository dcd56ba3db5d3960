from dataclasses import dataclass

# What runs the AdamW update when ZeRO keeps the optimizer state on the host (parallel.offload_optimizer
# cpu or nvme): DeepSpeed's SIMD, multi-threaded CPU Adam (ZeRO-Offload's design; 2.2x the step rate
# of torch AdamW at 1B on an H200 host, issue 20), or torch's AdamW (no C++ build needed).
OFFLOAD_IMPLS = ("deepspeed_cpu_adam", "torch")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | linear | constant (all after linear warmup)
    warmup_steps: int = 20
    weight_decay: float = 0.1  # matrices only; norms and biases are never decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # torch's fused AdamW where the device supports it
    offload_impl: str = "deepspeed_cpu_adam"  # deepspeed_cpu_adam | torch: the update on the host when offloaded


def check_optim_fields(o, error) -> None:
    """`error(field, message)` builds the exception (validate's ConfigError)."""
    if o.offload_impl not in OFFLOAD_IMPLS:
        raise error("optim.offload_impl", f"got {o.offload_impl!r}, allowed: {', '.join(OFFLOAD_IMPLS)}")
    if o.eps <= 0:
        raise error("optim.eps", f"got {o.eps}, must be > 0")
