from dataclasses import dataclass


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
