"""N:M sparse fine-tuning + SquareHead distillation options (configs/sparsity/*.yaml, issue 6),
read by train/sparsity/. Plain dataclasses so a Hydra structured config can embed them as they are
(e.g. `sparsity: SparsityConfig = field(default_factory=SparsityConfig)`)."""

from dataclasses import dataclass, field
from typing import List

DEFAULT_LAYERS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


@dataclass
class DistillConfig:
    """loss = ce_weight * CE + alpha_kl * T^2 * KL(teacher || student at temperature T)
    + beta_squarehead * sum_layers MSE(h_s, h_t) / MSE(h_t, 0)."""

    enabled: bool = True
    ce_weight: float = 1.0
    alpha_kl: float = 1.0
    beta_squarehead: float = 1.0
    temperature: float = 1.0
    teacher_dtype: str = "auto"  # auto (bf16 on GPU, model dtype on CPU) | bfloat16 | float16 | float32

    def validate(self) -> None:
        for name in ("ce_weight", "alpha_kl", "beta_squarehead"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"distill.{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature!r}")
        if self.teacher_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"distill.teacher_dtype must be one of auto|bfloat16|float16|float32, got {self.teacher_dtype!r}")


@dataclass
class SparsityConfig:
    enabled: bool = True
    n: int = 2  # keep n of every m consecutive inputs: 2:4 (default), 4:8, 1:4, ...
    m: int = 4
    method: str = "magnitude"  # one-shot mask: magnitude (|W|) | wanda (|W| * ||X||, needs calibration batches)
    calibration_batches: int = 8  # wanda: batches the trainer feeds to init_masks
    mode: str = "srste"  # srste (dense weights, STE + decay, masks recomputed) | fixed (pruned weights stay 0)
    srste_decay: float = 2e-4  # lambda of the sparse-refined term lambda * (1 - M) * W
    mask_update_every: int = 1  # srste: recompute masks every k optimizer steps
    layers: List[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))  # fnmatch patterns on module names
    schedule: str = "none"  # none (target n:m from step 0) | gradual (cubic sparsity ramp from dense)
    ramp_start_step: int = 0
    ramp_end_step: int = 1000
    ramp_power: float = 3.0  # sparsity(t) = s_final * (1 - (1 - t)^power), Zhu & Gupta cubic for 3
    backend: str = "auto"  # auto (2:4 cuSPARSELt forward where supported and the weight is >= 4096 a side, else
    # masked dense) | packed (wherever supported) | dense
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        if not (isinstance(self.m, int) and 2 <= self.m <= 32):
            raise ValueError(f"sparsity.m must be an int in [2, 32], got {self.m!r}")
        if not (isinstance(self.n, int) and 1 <= self.n < self.m):
            raise ValueError(f"sparsity.n must be an int in [1, m-1={self.m - 1}], got {self.n!r}")
        choices = {"method": ("magnitude", "wanda"), "mode": ("srste", "fixed"), "schedule": ("none", "gradual"), "backend": ("auto", "packed", "dense")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"sparsity.{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")
        if not (isinstance(self.srste_decay, (int, float)) and self.srste_decay >= 0):
            raise ValueError(f"sparsity.srste_decay must be a number >= 0, got {self.srste_decay!r}")
        if not (isinstance(self.mask_update_every, int) and self.mask_update_every >= 1):
            raise ValueError(f"sparsity.mask_update_every must be an int >= 1, got {self.mask_update_every!r}")
        if not (isinstance(self.calibration_batches, int) and self.calibration_batches >= 1):
            raise ValueError(f"sparsity.calibration_batches must be an int >= 1, got {self.calibration_batches!r}")
        if not self.layers or not all(isinstance(p, str) and p for p in self.layers):
            raise ValueError(f"sparsity.layers must be a non-empty list of module-name patterns, got {self.layers!r}")
        if self.schedule == "gradual":
            if not (0 <= self.ramp_start_step < self.ramp_end_step):
                raise ValueError(f"sparsity.ramp_start_step must be >= 0 and < ramp_end_step, got {self.ramp_start_step} and {self.ramp_end_step}")
            if not self.ramp_power > 0:
                raise ValueError(f"sparsity.ramp_power must be > 0, got {self.ramp_power!r}")
        self.distill.validate()
