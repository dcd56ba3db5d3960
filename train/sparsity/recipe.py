"""The N:M fine-tuning recipe as the trainer runs it: a frozen dense teacher (copied before the
model goes sparse), the Sparsifier, and the SquareHead objective, attached to the engine's step."""

import logging
from typing import Dict, List

import torch
from omegaconf import OmegaConf

from .report import format_report, sparsity_report, verify_nm
from .sparsify import Sparsifier
from .squarehead import Distiller, make_teacher

log = logging.getLogger(__name__)


def as_dataclass(cfg):
    return OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg


class SparseFinetune:
    def __init__(self, model: torch.nn.Module, sparsity_cfg, device: torch.device):
        self.cfg = as_dataclass(sparsity_cfg)
        self.model = model
        self.distiller = None
        if self.cfg.distill.enabled:
            dtype = self.cfg.distill.teacher_dtype
            if dtype == "auto":  # bf16 teacher on GPU (no grad, half the memory); exact fp32 on CPU
                dtype = "bfloat16" if device.type == "cuda" else "float32"
            self.distiller = Distiller(make_teacher(model, dtype).to(device), self.cfg.distill)
        self.sparsifier = Sparsifier(model, self.cfg)
        self.steps_done = 0
        self.last_metrics: Dict[str, float] = {}

    def attach(self, engine) -> None:
        """Hook into the engine's step (DataParallelEngine: `objective` and `step_hooks`)."""
        engine.step_hooks.append(self)
        if self.distiller is not None:
            engine.objective = self.objective

    def objective(self, student, tokens: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.distiller(student, tokens, targets)
        self.last_metrics = {k: float(out[k]) for k in ("kl", "squarehead") if k in out}
        return out

    def init_masks(self, calibration_batches: List[torch.Tensor]) -> None:
        self.sparsifier.init_masks(calibration_batches if self.cfg.method == "wanda" else None)
        log.info("one-shot %d:%d masks (%s)\n%s", self.cfg.n, self.cfg.m, self.cfg.method,
                 format_report(sparsity_report(self.model)))

    def before_optimizer_step(self) -> None:
        self.sparsifier.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.steps_done += 1
        self.sparsifier.after_optimizer_step(self.steps_done)

    def verify(self) -> int:
        return verify_nm(self.model, self.sparsifier.n, self.cfg.m)

    def state_dict(self) -> dict:
        return {"sparsifier": self.sparsifier.state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.steps_done = state["steps_done"]


def apply_saved_masks(model: torch.nn.Module, sparsity_cfg, state: dict) -> Sparsifier:
    """Make a freshly loaded model sparse again from a checkpoint's sparsity state, check the
    pattern, and bake the masks into plain weights (for export). Returns the spent Sparsifier."""
    sparsifier = Sparsifier(model, as_dataclass(sparsity_cfg))
    sparsifier.load_state_dict(state["sparsifier"])
    verify_nm(model, sparsifier.n, sparsifier.cfg.m)
    sparsifier.finalize()
    return sparsifier
